import pytest
from edgepack.runtime import open_package
from edgepack.toolchain import build as build_mod


def test_failure_mid_build_keeps_previous_package(tiny_model_dir, tiny_package, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    before = (out / "manifest.json").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(build_mod.package_writer, "write_generation", fail)
    with pytest.raises(OSError, match="disk full"):
        build_mod.build(build_mod.BuildConfig(model=str(tiny_model_dir)), out)
    assert (out / "manifest.json").read_bytes() == before
    open_package(out)  # still complete and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_generation_settings_capture_tokens_and_context(tiny_package):
    gen = open_package(tiny_package).generation
    assert gen.eos_token_ids == (2,)
    assert gen.context_length == 256  # the tiny model's max positions caps the default 2048
    assert gen.eos_token == "<|im_end|>"


def test_auto_graph_is_fused_for_llama_and_optimum_otherwise(capsys):
    import tiny
    from transformers import OPTConfig

    opt350 = OPTConfig(do_layer_norm_before=False)  # OPT-350m norms after each block: optimum's graph
    llama = tiny.make_model().config
    auto = build_mod.BuildConfig()
    assert auto.graph == "auto"
    assert build_mod.resolve_graph(auto, llama).graph == "fused"
    assert build_mod.resolve_graph(auto, opt350).graph == "optimum"
    assert "no fused graph: the fused graph norms before each block" in capsys.readouterr().err  # it says why
    assert build_mod.resolve_graph(build_mod.BuildConfig(graph="optimum"), llama).graph == "optimum"  # forced
    device = build_mod.BuildConfig(int4=True, int4_all=True)  # device layouts are optimum's
    assert build_mod.resolve_graph(device, llama).graph == "optimum"
    # without a fused graph, delta slots go into optimum's (export/delta_branches.py)
    assert build_mod.resolve_graph(build_mod.BuildConfig(delta_slots=True), opt350).graph == "optimum"


def test_default_build_of_a_llama_is_the_fused_graph(tiny_package):
    assert open_package(tiny_package).manifest.plan["graph"] == "fused"


def test_parity_prompts_leave_room_for_the_decode_steps_in_a_short_context():
    import tiny
    from edgepack.export.parity import DECODE_STEPS

    tokenizer = tiny.make_tokenizer()
    full = build_mod.parity_prompts(tokenizer)
    assert max(map(len, full)) > 16  # the prose passages are long: clipping is what is under test
    short = build_mod.parity_prompts(tokenizer, context=16)
    assert [p[:16 - DECODE_STEPS] for p in full] == short


def test_auto_takes_either_graph_and_refuses_with_both_reasons():
    from types import SimpleNamespace

    from edgepack.runtime.errors import UnsupportedArchitecture
    from transformers import BloomConfig, Starcoder2Config

    check = build_mod._exportable_check("auto")
    check(Starcoder2Config())  # optimum cannot export it, the fused graph builds it
    check(BloomConfig())  # the other way round
    with pytest.raises(UnsupportedArchitecture, match="cannot be exported with a KV cache.*nor has it a fused graph"):
        check(SimpleNamespace(model_type="rwkv"))
