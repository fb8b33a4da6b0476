"""Commands on architectures other than Llama: each works end to end or is refused by name, never a
traceback or a silently wrong figure (tiny random models from tests/tiny_archs.py, seconds each)."""

from __future__ import annotations

import json

import pytest
import tiny_archs
import torch
from edgepack.runtime import cli
from edgepack.runtime.errors import UnsupportedArchitecture

TEXT = "The while statement is used for repeated execution as long as an expression is true. " * 40


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return code, out, err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch → saved tiny model folder, made on first use."""
    root, made = tmp_path_factory.mktemp("archs"), {}

    def get(arch: str):
        if arch not in made:
            made[arch] = tiny_archs.save(arch, root / arch)
        return made[arch]

    return get


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    return path


def _ppl(out: str) -> float:
    return float(out.split()[1])


@pytest.mark.parametrize("arch", ["gemma", "gpt_neox", "qwen3_moe"])
def test_package_evaluates_like_pytorch_at_its_default_window(arch, models, text, tmp_path, capsys):
    # The tiny GPT-NeoX (16-wide heads) falls back to optimum's graph, Qwen3-MoE builds the fused one (its MoE op);
    # eval's default window is capped by the package's context (it failed on optimum packages, whose decoder has
    # no context of its own).
    src, pkg = models(arch), tmp_path / "pkg"
    code, _, _ = run_cli(["build", src, "-o", pkg], capsys)
    assert code == 0
    code, ours, _ = run_cli(["eval", pkg, "--text", text, "--max-windows", "1"], capsys)
    assert code == 0 and "1 window of 256" in ours
    code, theirs, _ = run_cli(["eval", src, "--text", text, "--context", "256", "--max-windows", "1"], capsys)
    assert code == 0 and abs(_ppl(ours) - _ppl(theirs)) / _ppl(theirs) < 1e-3


def test_gpt_neox_compresses_its_own_projection_names(models, tmp_path, capsys):
    out = tmp_path / "c"
    code, _, err = run_cli(["compress", models("gpt_neox"), "--ratio", "0.3", "--tune-steps", "2", "-o", out], capsys)
    assert code == 0 and "2 layers factorized" in err
    from edgepack.toolchain.ressvd import storage
    from transformers import AutoConfig

    model = storage.load(str(out), AutoConfig.from_pretrained(out))
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Sequential)}
    assert {"gpt_neox.layers.1.attention.query_key_value", "gpt_neox.layers.1.mlp.dense_4h_to_h"} <= names


def test_moe_experts_stay_dense_and_are_named(models, tmp_path, capsys):
    code, _, err = run_cli(["compress", models("qwen3_moe"), "--ratio", "0.2", "--tune-steps", "0", "-o",
                            tmp_path / "c"], capsys)
    assert code == 0 and "dense (mlp.gate, mlp.experts.0.gate_proj" in err


def test_conv1d_model_compresses_and_reloads_in_its_own_layout(models, text, tmp_path, capsys):
    # GPT-2's Conv1D projections are compressed as nn.Linear (toolchain/conv1d.py); those left dense are saved
    # as Conv1D again, so the folder loads as a GPT-2 and the package computes what PyTorch does.
    from edgepack.toolchain.ressvd import storage
    from transformers import AutoConfig

    src, out, pkg = models("gpt2"), tmp_path / "c", tmp_path / "pkg"
    code, _, err = run_cli(["compress", src, "--ratio", "0.2", "--tune-steps", "2", "-o", out], capsys)
    assert code == 0 and "1 layers factorized" in err
    model = storage.load(str(out), AutoConfig.from_pretrained(out))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))}
    assert kinds["transformer.h.0.attn.c_attn"] == "Conv1D" and kinds["transformer.h.1.attn.c_attn"] == "Sequential"
    assert run_cli(["build", out, "-o", pkg], capsys)[0] == 0
    _, ours, _ = run_cli(["eval", pkg, "--text", text, "--context", "64", "--max-windows", "1"], capsys)
    _, theirs, _ = run_cli(["eval", out, "--text", text, "--context", "64", "--max-windows", "1"], capsys)
    assert abs(_ppl(ours) - _ppl(theirs)) / _ppl(theirs) < 1e-3


def test_conv1d_delta_is_in_linear_layout_and_names_the_loaded_weights(models):
    from edgepack.toolchain.delta.extract import extract, fingerprint

    base, ft = tiny_archs.make_model("gpt2"), tiny_archs.make_model("gpt2", seed=1)
    before = fingerprint(base)  # what a package of the Conv1D model records
    raw = extract(base, ft)
    assert raw.base_fingerprint == before
    assert raw.linears["transformer.h.0.attn.c_attn"].shape == (192, 64)  # [n_out, n_in]


def test_delta_tune_runs_on_gpt_neox(models, text, tmp_path, capsys):
    src = models("gpt_neox")
    ft = tiny_archs.save_finetune(src, tmp_path / "ft")
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(["delta", src, ft, "-o", out, "--method", "osd", "--rank", "1", "--valid", text,
                            "--windows", "2", "--tune-steps", "2"], capsys)
    assert code == 0 and out.is_file() and "8 layers" in err


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "granitemoe"])  # GraniteMoE: 3-D expert parameters
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_planner_counts_the_expert_bytes_the_fused_graph_stores(arch, dtype, tmp_path):
    """A mixture of experts is planned with all its experts resident: the memory model's expert bytes are what
    the fused graph's MoE / QMoE op stores (float32, or int4 with integer zero points), routers aside."""
    import onnx
    from edgepack.export.fused.builder import save
    from edgepack.export.fused.llama import build_llama
    from edgepack.runtime import memory
    from edgepack.toolchain.planner.plan import model_shape

    model = tiny_archs.make_model(arch)
    model.config.save_pretrained(tmp_path)  # the planner reads config.json only
    shape = model_shape(str(tmp_path))
    save(build_llama(model, 64, int4=dtype == "int4"), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer if ".experts." in t.name)
    assert stored > 0 and memory.weight_bytes(shape, dtype, graph="fused")["experts"] - stored == sum(
        memory.matrix_bytes(o, k, dtype) * n for o, k, n in shape.fixed_linears if o == 4)  # the routers: 4 experts


def test_a_plan_holds_every_expert(tmp_path):
    """More experts (the same top-2 routing) make a package larger by exactly their bytes at the plan's width."""
    from edgepack.runtime import memory
    from edgepack.runtime.profiles import load_profile
    from edgepack.toolchain.planner.plan import plan_for

    plans = {}
    for experts in (4, 12):
        config = tiny_archs.ARCHS["mixtral"]()
        config.num_local_experts = experts
        config.save_pretrained(tmp_path / str(experts))
        plans[experts] = plan_for(str(tmp_path / str(experts)), load_profile("raspberry-pi-4"))
    small, large = plans[4], plans[12]
    assert (small.dtype, small.graph) == (large.dtype, large.graph) == (small.dtype, "fused")
    config = tiny_archs.ARCHS["mixtral"]()
    hidden, inner, dtype = config.hidden_size, config.intermediate_size, small.dtype
    expert = 2 * memory.matrix_bytes(inner, hidden, dtype) + memory.matrix_bytes(hidden, inner, dtype)
    router_growth = memory.matrix_bytes(12, hidden, dtype) - memory.matrix_bytes(4, hidden, dtype)
    assert large.package_bytes - small.package_bytes == config.num_hidden_layers * (8 * expert + router_growth)


def test_rank_map_naming_missing_layers_is_refused():
    from edgepack.toolchain.ressvd import ResSVDConfig, compress_

    ranks = {"model.layers.1.self_attn.q_proj": 4}  # the planner's Llama-style names
    with pytest.raises(UnsupportedArchitecture, match="without --device"):
        compress_(tiny_archs.make_model("gpt_neox"), ResSVDConfig(method="svd", rank_map=ranks))


def test_exporter_failure_is_refused_by_name(models, tmp_path, capsys):
    # optimum-onnx 0.1.0 cannot trace Falcon with grouped KV heads (a KV cache concat fails); --graph auto builds
    # the fused graph for it instead
    code, _, err = run_cli(["build", models("falcon"), "-o", tmp_path / "p", "--graph", "optimum"], capsys)
    assert code == 2 and "exporter failed on model type 'falcon'" in err and not (tmp_path / "p").exists()


def test_factor_tune_replays_bloom_whose_alibi_folds_windows_with_heads(models, text, tmp_path, capsys):
    # Bloom's ALiBi bias is [windows·heads, 1, tokens]: the tune unfolds it to slice windows (it was refused)
    from edgepack.toolchain.ressvd.tune import _rows

    folded = torch.arange(4 * 3 * 5.0).view(4 * 3, 1, 5)  # 4 windows x 3 heads
    rows = _rows(folded, torch.tensor([2, 0]), 4)
    assert torch.equal(rows, torch.cat([folded[6:9], folded[0:3]]))
    assert torch.equal(_rows(torch.arange(8), torch.tensor([1]), 4), torch.arange(8))  # 1-D: never unfolded
    out = tmp_path / "c"
    code, _, err = run_cli(["compress", models("bloom"), "--ratio", "0.2", "--tune-steps", "2", "-o", out], capsys)
    assert code == 0 and "layers factorized" in err
    assert run_cli(["eval", out, "--text", text, "--context", "64", "--max-windows", "1"], capsys)[0] == 0


@pytest.mark.parametrize("arch, norm", [("opt", "model.decoder.final_layer_norm"), ("gpt2", "transformer.ln_f"),
                                        ("gpt_neox", "gpt_neox.final_layer_norm"), ("llama", "model.norm"),
                                        ("lfm2", "model.embedding_norm")])
def test_factor_tune_finds_each_family_final_norm(arch, norm):
    from edgepack.toolchain.ressvd.tune import _final_norm

    model = tiny_archs.make_model(arch)
    assert _final_norm(model) is model.get_submodule(norm)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_delta_tune_reads_each_family_decoder(arch):
    from edgepack.toolchain.delta.tune import head_inputs

    model = tiny_archs.make_model(arch)
    with torch.no_grad():
        hidden = head_inputs(model, torch.tensor([[5, 17, 42]]))
    assert hidden.shape == (1, 3, model.config.hidden_size)


def test_source_eval_window_stays_within_the_model_positions(models, text, capsys):
    # GPT-2's learned position table has 256 rows here: the default 512-token window raised IndexError
    src = models("gpt2")
    code, out, _ = run_cli(["eval", src, "--text", text, "--max-windows", "1"], capsys)
    assert code == 0 and "1 window of 256" in out
    code, _, err = run_cli(["eval", src, "--text", text, "--context", "300"], capsys)
    assert code == 2 and "pass --context 256 or less" in err


def test_calibration_and_validation_windows_fit_a_short_position_table(models, text, tmp_path, capsys):
    # 256-token windows on a model with 128 learned positions raised IndexError
    src = models("opt-128")
    code, _, err = run_cli(["compress", src, "--ratio", "0.2", "--tune-steps", "2", "-o", tmp_path / "c"], capsys)
    assert code == 0 and "layers factorized" in err
    ft = tiny_archs.save_finetune(src, tmp_path / "ft")
    code, _, err = run_cli(["delta", src, ft, "-o", tmp_path / "d.safetensors", "--method", "osd", "--rank", "1",
                            "--valid", text, "--windows", "2", "--tune-steps", "2"], capsys)
    assert code == 0 and (tmp_path / "d.safetensors").is_file()


@pytest.mark.parametrize("arch", ["gpt_neox", "opt", "gpt2", "lfm2"])  # LFM2: convolution and attention layers
def test_device_plans_name_each_familys_own_layers(arch, models, tmp_path):
    # The planner's memory model read Llama's block from config keys: it refused GPT-2 (n_head) and OPT
    # (ffn_dim), and planned GPT-NeoX with Llama's layer names, which compression then refused.
    from edgepack.runtime.profiles import MB, DeviceProfile
    from edgepack.toolchain import conv1d
    from edgepack.toolchain.planner.device_build import build_for_device
    from edgepack.toolchain.planner.plan import candidates, graph_for, model_shape

    src = models(arch)
    shape = model_shape(str(src))
    model = tiny_archs.make_model(arch)
    conv1d.to_linear(model)
    expected = {n: tuple(m.weight.shape) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    assert {n: (o, i) for layer in shape.linears() for n, o, i in layer} == expected
    graph = graph_for(json.loads((src / "config.json").read_text()))  # GPT-2's is fused, the others' optimum's
    compressed = min(candidates(shape, 128, graph), key=lambda c: c.estimate.peak)  # only it fits
    assert compressed.ratio > 0
    tight = DeviceProfile(name="tight", description="made-up board", kind="sbc", ram_mb=1000,
                          app_memory_mb=round(compressed.estimate.peak / MB, 3) + 0.001, storage_mb=100, cores=2,
                          cpu="test", arch="aarch64", execution_providers=("CPUExecutionProvider",))
    path = tmp_path / "tight.yaml"
    path.write_text(tight.to_yaml())
    plan, manifest = build_for_device(str(src), str(path), tmp_path / "pkg", context=128)
    assert plan.ranks and set(plan.ranks) <= set(expected)
    assert manifest.plan["compression"]["ranks"] == plan.ranks


def test_falcon_plans_its_grouped_kv_heads(models):
    # FalconConfig names them num_kv_heads: the planner sized Falcon's KV cache for all 4 heads
    from edgepack.toolchain.planner.plan import model_shape

    assert model_shape(str(models("falcon"))).kv_heads == 2


def test_lfm2_is_planned_layer_by_layer_with_a_kv_cache_for_its_attention_layers(models):
    # its convolution layers have in_proj / out_proj and keep no KV cache; its attention layers q/k/v / out_proj
    from edgepack.runtime import memory
    from edgepack.toolchain.planner.plan import model_shape

    shape = model_shape(str(models("lfm2")))
    names = [[n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, _, _ in layer] for layer in shape.linears()]
    assert names[0] == ["conv.in_proj", "conv.out_proj", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"]
    assert names[1][:4] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
    assert shape.kv_layers == 1
    assert shape.fixed_linears == ()  # the convolution's 3-D weight is not an expert stack
    assert memory.kv_cache_bytes(shape, 100) == 2 * shape.kv_heads * shape.head_dim * 100 * 4
    assert memory.ModelShape(**json.loads(json.dumps(shape.to_dict()))) == shape  # as a manifest records it


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "granitemoehybrid", "bamba", "falcon_h1"])
def test_state_space_layers_are_planned_with_their_states_not_a_kv_cache(models, arch):
    # Mamba keeps no KV cache at all, Granite 4's hybrid one for its attention layer; both hold their Mamba layers'
    # convolution and SSM states whatever the context
    from edgepack.runtime import memory
    from edgepack.toolchain.planner.plan import model_shape

    shape = model_shape(str(models(arch)))
    attention = {"granitemoehybrid": 1, "bamba": 1, "falcon_h1": None}.get(arch, 0)  # Falcon-H1: every layer attends
    assert shape.kv_layers == attention
    layers, inner, state = 2, 128, 8  # Mamba layers; a Mamba 2 convolves x, B and C (its groups' N each)
    conv = {"mamba": inner, "mamba2": inner + 2 * 2 * state, "granitemoehybrid": inner + 2 * state,
            "bamba": inner + 2 * state, "falcon_h1": inner + 2 * 2 * state}[arch]
    assert shape.state_bytes == layers * (conv * 3 + inner * state) * 4
    assert shape.scan_bytes == (5 if arch == "mamba" else 2) * inner * state * 4
    kv = 2 * (attention if attention is not None else layers) * shape.kv_heads * shape.head_dim * 100 * 4
    assert memory.kv_cache_bytes(shape, 100) == kv + shape.state_bytes
    assert any(name.endswith(("mixer.in_proj", "mamba.in_proj")) for name, _, _ in shape.linears()[0])
    assert memory.ModelShape(**json.loads(json.dumps(shape.to_dict()))) == shape
