"""The quantization-aware factor tune (toolchain/ressvd/quant.py): its rounding is the exporter's, bit for
bit, its gradient passes straight through, and tuning through it lowers the loss of the int4-rounded model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from edgepack.export.fused import blocks
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.ressvd import ResSVDConfig, quant, selection, tune
from torch.nn.utils import parametrize

SHAPES = [(40, 64), (33, 70), (7, 33), (64, 5), (12, 32)]


def _weight(shape, seed=0) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
    w[0, : min(32, shape[1])] = 0.0  # a constant block (scale falls back to 1)
    if shape[0] > 1:
        w[1] = np.abs(w[1]) + 0.01  # all-positive blocks: the zero point sits at the range's end
    return w


@pytest.mark.parametrize("shape", SHAPES)
def test_fake_int4_is_the_exporters_dequantized_matmulnbits_weight(shape):
    w = _weight(shape)
    exported = blocks.dequantize_q4_int(blocks.quantize_q4_int(w))
    assert np.array_equal(quant.fake_int4(torch.from_numpy(w)).numpy(), exported)


@pytest.mark.parametrize("shape", SHAPES)
def test_fake_int8_is_the_exporters_8bit_factor_weight(shape):
    w = _weight(shape, seed=1)
    q8 = blocks.quantize_q8(w)
    exported = ((q8.data.astype(np.float32) - 128) * q8.scales.reshape(q8.n_out, -1, 1)).reshape(q8.n_out, -1)
    assert np.array_equal(quant.fake_int8(torch.from_numpy(w)).numpy(), exported[:, : shape[1]])


def test_gradient_passes_straight_through_the_rounding():
    w = torch.from_numpy(_weight((8, 40))).requires_grad_(True)
    upstream = torch.randn(8, 40)
    (quant.FakeQuant("int4")(w) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_fake_quantized_rounds_inside_and_restores_the_trained_float_weights():
    pair = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(8, 48, bias=False))
    params = [pair[0].weight, pair[1].weight]
    with quant.fake_quantized([pair, pair], "int4"):  # a module met twice (joint groups) is wrapped once
        assert torch.equal(pair[0].weight, quant.fake_int4(params[0]))
        assert {id(p) for p in pair.parameters()} == {id(p) for p in params}
        with torch.no_grad():
            params[1].add_(0.5)  # what a tune step does to the float weight
    assert not parametrize.is_parametrized(pair[0]) and not parametrize.is_parametrized(pair[1])
    assert pair[0].weight is params[0] and pair[1].weight is params[1]
    assert not torch.equal(pair[1].weight, quant.fake_int4(pair[1].weight))  # float again, the step kept


def _rounded_loss(model, trace) -> float:
    """The distillation loss of ``model`` with its factors rounded as the int4 package rounds them."""
    pairs = [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]
    with quant.fake_quantized(pairs, "int4"):
        return tune.distillation_loss(model, trace)


def test_quant_aware_tune_lowers_the_int4_rounded_loss():
    """From the same compressed start, the tune through int4 rounding ends with a lower loss of the
    int4-rounded model than the float tune does (it wins back over 40 % of what rounding the float tune's
    factors costs: 0.0245 -> 0.0236 of 0.0231 when written), and leaves plain float factors behind."""
    import tiny
    from edgepack.toolchain.ressvd.sequential import compress_sequential_

    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    model = tiny.make_model(seed=5, layers=4)
    ranks = selection.last_k_ranks(selection.target_linears(model, ResSVDConfig().targets), 0.3, 2)
    traces = []
    compress_sequential_(model, ranks, windows, trace=traces)
    (trace,) = traces
    rounded, floats = {}, {}
    for mode in ("none", "int4"):
        tuned = copy.deepcopy(model)
        tune.tune_(tuned, trace, tune.TuneSettings(steps=30, lr=1e-3, batch=2, positions=16, bf16=False, quant=mode))
        assert not any(parametrize.is_parametrized(m) for m in tuned.modules())
        rounded[mode], floats[mode] = _rounded_loss(tuned, trace), tune.distillation_loss(tuned, trace)
    assert floats["none"] < rounded["none"] < _rounded_loss(model, trace)  # rounding costs; the tune helps
    assert rounded["none"] - rounded["int4"] > 0.4 * (rounded["none"] - floats["none"])


def test_quant_aware_option_is_validated_and_recorded():
    assert ResSVDConfig().quant_aware == "auto"
    assert ResSVDConfig.from_dict(ResSVDConfig(quant_aware="int4").to_dict()).quant_aware == "int4"
    for bad in (dict(quant_aware="int3"), dict(quant_aware="int4", tune_steps=0)):
        with pytest.raises(UsageError):
            ResSVDConfig(**bad)


def test_inline_int4_build_tunes_for_its_factor_width_and_records_it(tiny_model_dir, tmp_path):
    """``build --ratio --int4``: "auto" tunes through the package's own factor rounding; the package records
    the factor width, and the memory model's byte count is what it stores."""
    import json

    from edgepack.runtime import load, memory
    from edgepack.runtime.manifest import MODEL_NAME
    from edgepack.toolchain.build import BuildConfig, build

    compression = ResSVDConfig(ratio=0.2, layers=2, calib_windows=4, calib_length=64, tune_steps=2)
    for bits in (4, 8):
        out = tmp_path / f"pkg{bits}"
        manifest = build(BuildConfig(model=str(tiny_model_dir), int4=True, factor_bits=bits, compression=compression,
                                     graph="fused"), out)
        assert manifest.plan["config"]["factor_bits"] == bits
        assert manifest.plan["compression"]["config"]["quant_aware"] == f"int{bits}"
        assert ("8-bit (symmetric" in manifest.plan["weights"]) == (bits == 8)
        shape = memory.ModelShape(**manifest.model["shape"])
        predicted = memory.weight_bytes(shape, "int4", manifest.plan["compression"]["ranks"], "fused", bits)
        graph = onnx_graph(out / MODEL_NAME)
        stored = sum(t.nbytes for name, t in graph.items() if name.startswith("layers.") and "norm" not in name)
        assert stored == predicted["linear"]
        assert len(load(out).generate("hi", max_new_tokens=2).tokens) >= 1
    # a standalone compress cannot know the package: "auto" tunes in float, and says so in its record
    from edgepack.toolchain.compression import compress

    compress(str(tiny_model_dir), compression, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "edgepack_compression.json").read_text())["config"]["quant_aware"] == "none"


def onnx_graph(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_factor_bits_is_validated(tiny_model_dir, tmp_path, capsys):
    from edgepack.runtime import cli
    from edgepack.toolchain.build import BuildConfig

    with pytest.raises(UsageError):
        BuildConfig(int4=True, factor_bits=5)
    assert cli.main(["build", str(tiny_model_dir), "--factor-bits", "8", "-o", str(tmp_path / "x")]) == 2
    assert "--factor-bits" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["compress", str(tiny_model_dir), "--ratio", "0.2", "--tune-steps", "0", "--quant-aware", "int4",
                     "-o", str(tmp_path / "y")]) == 2
    assert "--quant-aware" in capsys.readouterr().err


def test_balancing_keeps_the_product_and_lowers_the_int4_error_of_a_skewed_split():
    """A = U·Σ, B = Vᵀ (all the scale on one side, as whitening and the residual stage leave it): one block
    scale of A serves columns of very different sizes. Balancing keeps A·B, makes each column of A as long
    as its row of B, leaves B's int4 error as it was (B rounds per row) and lowers A's; an SVD's own √σ split
    is already balanced and stays as it was."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(160, 64, generator=g))
    sigma = torch.logspace(0, -3, 64)[torch.randperm(64, generator=g)]

    def pair_of(a, b) -> torch.nn.Sequential:
        pair = torch.nn.Sequential(torch.nn.Linear(160, 64, bias=False), torch.nn.Linear(64, 96, bias=False))
        with torch.no_grad():
            pair[0].weight.copy_(b)
            pair[1].weight.copy_(a)
        return pair

    def errors(pair) -> tuple[float, float, torch.Tensor]:
        a, b = pair[1].weight.detach(), pair[0].weight.detach()
        product = a @ b
        err_a = float((quant.fake_int4(a) @ b - product).norm() / product.norm())
        err_b = float((a @ quant.fake_int4(b) - product).norm() / product.norm())
        return err_a, err_b, product

    skewed = pair_of(u * sigma, v.T)
    a_before, b_before, product = errors(skewed)
    assert quant.balance_([skewed, skewed]) == 1  # a pair met twice (joint groups) is balanced once
    a_after, b_after, balanced = errors(skewed)
    assert torch.allclose(skewed[1].weight.norm(dim=0), skewed[0].weight.norm(dim=1), rtol=1e-4)
    assert torch.allclose(balanced, product, atol=1e-6)
    assert b_after == pytest.approx(b_before, rel=1e-3)
    assert a_after < 0.7 * a_before
    svd = pair_of(u * sigma.sqrt(), sigma.sqrt()[:, None] * v.T)
    before = svd[1].weight.detach().clone()
    quant.balance_([svd])
    assert torch.allclose(svd[1].weight, before, rtol=1e-5)


def test_compression_leaves_balanced_factors_unless_a_quant_aware_tune_trained_their_codes():
    import tiny
    from edgepack.toolchain.ressvd import compress_

    windows = [list(range(i, i + 32)) for i in range(0, 128, 32)]

    def balanced(model) -> list[bool]:
        return [torch.allclose(m[1].weight.norm(dim=0), m[0].weight.norm(dim=1), rtol=1e-3)
                for m in model.modules() if isinstance(m, torch.nn.Sequential)]

    for mode, steps in (("none", 0), ("none", 2), ("int4", 2)):
        model = tiny.make_model(seed=5, layers=4)
        compress_(model, ResSVDConfig(ratio=0.3, layers=2, tune_steps=steps, tune_batch=2, quant_aware=mode), windows)
        flags = balanced(model)
        assert flags and (all(flags) if mode == "none" else not all(flags))
