"""The fused Llama graph (export/fused) and its runtime decoder, on the tiny random Llama."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import tiny
import torch
from edgepack.export import parity
from edgepack.export.fused import blocks
from edgepack.export.fused.builder import save
from edgepack.export.fused.llama import build_llama, check_supported
from edgepack.runtime import load
from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.runtime.fused_decoder import FusedDecoder, FusedKVCache
from edgepack.runtime.manifest import Manifest

CONTEXT = 64
PROMPTS = [[5, 17, 33, 101, 7, 250, 3, 99], list(range(40, 70))]


def _graph(model, tmp_path, name: str, int4: bool = False):
    path = tmp_path / f"{name}.onnx"
    save(build_llama(model, CONTEXT, int4), path)
    return path


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_float_graph_matches_pytorch_prefill_and_decode(tmp_path):
    model = tiny.make_model()
    report = parity.compare(model, _graph(model, tmp_path, "f32"), PROMPTS, decode_steps=4,
                            decoder_class=FusedDecoder)
    assert report.passed
    assert report.max_abs_diff < 1e-4
    assert report.top1_agreement == 1.0


def test_cached_decode_equals_full_recompute(tmp_path):
    model = tiny.make_model()
    decoder = FusedDecoder(_graph(model, tmp_path, "f32"))
    ids = PROMPTS[1]
    full = decoder.forward(ids, decoder.new_cache(), all_logits=True)
    cache = decoder.new_cache()
    steps = [decoder.forward(ids[:10], cache)]
    steps += [decoder.forward([t], cache) for t in ids[10:20]]
    steps.append(decoder.forward(ids[20:], cache, all_logits=True)[-1])  # several new tokens after a past
    assert np.abs(np.stack(steps) - full[[9, *range(10, 20), len(ids) - 1]]).max() < 1e-4
    assert cache.length == len(ids)
    # Truncating (a shared chat prefix) and feeding other tokens overwrites the old positions.
    cache.truncate(5)
    again = decoder.forward(ids[5:12], cache, all_logits=True)
    assert np.abs(again - full[5:12]).max() < 1e-4


def test_prefill_computes_logits_for_the_last_position_only_unless_asked(tmp_path):
    model = tiny.make_model()
    decoder = FusedDecoder(_graph(model, tmp_path, "f32"))
    assert decoder.keeps_logits
    ids = PROMPTS[1]
    full = decoder.forward(ids, decoder.new_cache(), all_logits=True)
    assert full.shape == (len(ids), model.config.vocab_size)
    seen = []
    run = decoder.session.run_with_iobinding
    decoder.session.run_with_iobinding = lambda binding: (run(binding), seen.append(binding.get_outputs()[0]))
    last = decoder.forward(ids, decoder.new_cache())
    assert seen[0].shape() == [1, 1, model.config.vocab_size]  # the graph itself made one position's logits
    assert np.abs(last - full[-1]).max() < 1e-5


def test_cache_is_preallocated_and_reused(tmp_path):
    model = tiny.make_model()
    decoder = FusedDecoder(_graph(model, tmp_path, "f32"))
    cache = decoder.new_cache()
    assert isinstance(cache, FusedKVCache)
    assert cache.values[0].shape() == [1, 2, CONTEXT, 16]
    decoder.forward([1, 2, 3], cache)
    decoder.forward([4], cache)
    binding = cache.binding
    decoder.forward([5], cache)
    assert cache.binding is binding  # one binding for every single-token step
    with pytest.raises(Exception, match="context"):
        decoder.forward(list(range(CONTEXT)), cache)


def test_cache_grows_by_doubling_and_keeps_its_prefix(tmp_path):
    model = tiny.make_model()
    decoder = FusedDecoder(_graph(model, tmp_path, "f32"))
    assert decoder.context_length == CONTEXT
    decoder.initial_capacity = 8
    ids = PROMPTS[1]
    full = decoder.forward(ids, decoder.new_cache(), all_logits=True)  # 30 positions: one allocation of 30
    cache = decoder.new_cache()
    assert cache.capacity == 8
    got = [decoder.forward(ids[:6], cache)]
    capacities = []
    for t in ids[6:]:
        got.append(decoder.forward([t], cache))
        capacities.append(cache.capacity)
    assert sorted(set(capacities)) == [8, 16, 32]
    assert np.abs(np.stack(got) - full[5:]).max() < 1e-4


def test_weights_are_external_data_and_old_single_file_graphs_still_load(tmp_path):
    model = tiny.make_model()
    path = tmp_path / "model.onnx"
    files = save(build_llama(model, CONTEXT, True), path)
    assert files == [path, tmp_path / "model.onnx.data"] and files[1].stat().st_size > path.stat().st_size
    inline = tmp_path / "inline.onnx"
    onnx.save_model(onnx.load(str(path)), str(inline))  # the layout of packages built before #7's memory work
    ids = PROMPTS[0]
    a = FusedDecoder(path).forward(ids, FusedDecoder(path).new_cache(), all_logits=True)
    old = FusedDecoder(inline)
    assert np.array_equal(a, old.forward(ids, old.new_cache(), all_logits=True))


def test_cache_spans_the_context_without_regrowing(tmp_path):
    decoder = FusedDecoder(_graph(tiny.make_model(), tmp_path, "f32"))
    cache = decoder.new_cache()
    assert cache.capacity == CONTEXT
    arrays = cache.arrays
    for t in PROMPTS[1]:
        decoder.forward([t], cache)
    assert cache.arrays is arrays and not arrays[0][:, :, len(PROMPTS[1]):].any()


def test_int4_graph_matches_pytorch_on_its_own_weights(tmp_path):
    """int4 computes Q4_1-form blocks exactly: against PyTorch running the dequantized weights, only
    the int8 activations of MatMulNBits' fast kernel differ."""
    model = tiny.make_model()
    graph = onnx.load(str(_graph(model, tmp_path, "int4", int4=True))).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # packed qkv, o, packed gate/up, down per layer; LM head
    assert sum(i.name.startswith("embed") for i in graph.initializer) == 2  # tied table stored once (+scales)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = blocks.dequantize_q4(blocks.quantize_q4(module.weight.numpy()))
                module.weight.copy_(torch.from_numpy(w))
        q8 = blocks.quantize_q8(reference.model.embed_tokens.weight.numpy())
        table = (q8.data.astype(np.float32) - 128) * q8.scales.reshape(q8.n_out, -1, 1)
        reference.model.embed_tokens.weight.copy_(torch.from_numpy(table.reshape(q8.n_out, -1)))
    decoder = FusedDecoder(tmp_path / "int4.onnx")
    ref = _torch_logits(reference, PROMPTS[1])
    got = decoder.forward(PROMPTS[1], decoder.new_cache(), all_logits=True)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def test_q4_blocks_represent_q4_1_weights_exactly():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(8, 4, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 maps each block's min and max to codes 0 and 15
    d = rng.uniform(0.01, 0.1, size=(8, 4, 1))
    m = rng.uniform(-1.0, 0.0, size=(8, 4, 1))
    w = (codes * d + m).astype(np.float32).reshape(8, 128)
    assert np.abs(blocks.dequantize_q4(blocks.quantize_q4(w)) - w).max() < 1e-6


def test_remainder_digits_are_close_to_the_remainders():
    rng = np.random.default_rng(1)
    remainder = rng.normal(size=(16, 48)).astype(np.float32)
    packed, scales, error = blocks.remainder_digits(remainder)
    assert packed.shape == (16, 4, 16) and scales.shape == (16 * 4,)  # 48 sums pad to 64: 2 blocks per digit
    assert np.abs(error).max() < np.abs(remainder).max() / 150


def test_factorized_layers_become_two_matmuls(tmp_path):
    model = tiny.make_model()
    layer = model.model.layers[1]
    layer.self_attn.q_proj = tiny.factorized(layer.self_attn.q_proj, 24)
    layer.mlp.down_proj = tiny.factorized(layer.mlp.down_proj, 40)  # a rank that is not a whole block
    for int4, op in ((False, "MatMul"), (True, "MatMulNBits")):
        path = _graph(model, tmp_path, f"svd{int(int4)}", int4=int4)
        nodes = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
        for name in ("layers.1.attn.q", "layers.1.mlp.down"):
            assert nodes[f"{name}.0/{op}"] == op and nodes[f"{name}.1/{op}"] == op
        assert not any(n.startswith("layers.1.attn.qkv") for n in nodes)  # q is no longer packed with k, v
    report = parity.compare(model, tmp_path / "svd0.onnx", PROMPTS, decoder_class=FusedDecoder)
    assert report.passed


def test_other_architectures_are_refused_by_name():
    from transformers import RwkvConfig

    with pytest.raises(UnsupportedArchitecture, match="rwkv"):  # a recurrent model: no attention to fuse
        check_supported(RwkvConfig())


@pytest.fixture(scope="module")
def fused_int4_package(tmp_path_factory, tiny_model_dir):
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path_factory.mktemp("fused") / "tiny-fused-int4"
    build(BuildConfig(model=str(tiny_model_dir), int4=True, graph="fused", context=128), out)
    return out


def test_fused_int4_package_builds_and_generates(fused_int4_package):
    manifest = Manifest.from_json((fused_int4_package / "manifest.json").read_text())
    assert manifest.plan["graph"] == "fused" and manifest.dtype == "int4"
    assert manifest.parity["float32"]["passed"]
    model = load(fused_int4_package)
    assert isinstance(model.decoder, FusedDecoder)
    out = model.generate("hello", max_new_tokens=6, ignore_eos=True)
    assert len(out.tokens) == 6
    chat = model.session()
    chat.ask("hello", max_new_tokens=3)
    length = chat.cache.length
    chat.ask("again", max_new_tokens=3)  # the kept cache is extended, not refilled
    assert chat.cache.length > length
