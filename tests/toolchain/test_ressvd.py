import numpy as np
import pytest
import torch
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.ressvd import ResSVDConfig, compress_, factorize, selection
from edgepack.toolchain.ressvd.config import DEFAULT_TUNE_STEPS
from edgepack.toolchain.ressvd.layers import factorized_linear, rank_for_ratio


def correlated_inputs(n=2000, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ (mix * scales[:, None])


def test_full_rank_factorization_equals_dense():
    w = torch.randn(40, 48, dtype=torch.float64)
    x = correlated_inputs()
    s = factorize.whitening(x.T @ x, 1e-4)
    for a, b in (factorize.plain(w, 40), factorize.whitened(w, 40, s)):
        torch.testing.assert_close(a @ b, w, atol=1e-8, rtol=1e-8)
    layer = factorized_linear(*factorize.plain(w, 40), bias=torch.ones(40), dtype=torch.float64)
    torch.testing.assert_close(layer(x[:5]), x[:5] @ w.T + 1)


def test_whitened_beats_plain_on_output_error():
    w = torch.randn(40, 48, dtype=torch.float64)
    x = correlated_inputs()
    s = factorize.whitening(x.T @ x, 1e-4)

    def out_err(a, b):
        return float(((x @ (w - a @ b).T) ** 2).sum())

    assert out_err(*factorize.whitened(w, 8, s)) < 0.5 * out_err(*factorize.plain(w, 8))


def test_residual_split_keeps_storage():
    w = torch.randn(40, 48, dtype=torch.float64)
    x = correlated_inputs()
    s = factorize.whitening(x.T @ x, 1e-4)
    a, b = factorize.residual(w, 20, s, share=0.1)
    assert a.shape == (40, 20) and b.shape == (20, 48)


def test_cholesky_falls_back_to_damping():
    x = correlated_inputs(n=10)  # rank 10 < 48: X·Xᵀ is singular
    s = factorize.whitening(x.T @ x, 1e-4)
    assert torch.isfinite(s).all()


def test_rank_formula():
    assert rank_for_ratio(576, 1536, 0.2) == int(0.8 * 576 * 1536 // (576 + 1536))


@pytest.fixture
def model():
    import tiny

    return tiny.make_model(seed=5, layers=4)


def test_last_k_meets_overall_ratio(model):
    per_layer = selection.target_linears(model, ResSVDConfig().targets)
    for ratio, k in [(0.2, 4), (0.2, 2), (0.3, 3)]:
        ranks = selection.last_k_ranks(per_layer, ratio, k)
        assert {n.split(".")[2] for n in ranks} == {str(i) for i in range(4 - k, 4)}
        share = selection.removed_share(per_layer, ranks)
        total = sum(selection.params(layer) for layer in per_layer)
        slack = sum(m.in_features + m.out_features for layer in per_layer[4 - k:] for _, m in layer) / total
        assert ratio <= share <= ratio + slack  # flooring ranks removes at most one rank per layer more


def test_impossible_ratio_is_refused(model):
    per_layer = selection.target_linears(model, ResSVDConfig().targets)
    with pytest.raises(UsageError, match="--layers 2 or more"):
        selection.last_k_ranks(per_layer, 0.4, 1)
    with pytest.raises(UsageError, match="ratio"):
        ResSVDConfig(ratio=1.5)
    with pytest.raises(UsageError, match="method"):
        ResSVDConfig(method="magic")


def test_compress_auto_reports_search_and_shrinks(model):
    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    before = sum(p.numel() for p in model.parameters())
    report = compress_(model, ResSVDConfig(ratio=0.25, propagate=False, calib_windows=8, calib_length=32), windows)
    assert report.search and {p["k"] for p in report.search} >= {4}
    best = min(report.search, key=lambda p: p["hidden_error"])
    assert report.layers_compressed == best["k"]
    assert report.params_after < before
    assert isinstance(model.model.layers[-1].mlp.down_proj, torch.nn.Sequential)


def test_auto_layers_with_propagation_take_half_of_each_layer(model):
    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    per_layer = selection.target_linears(model, ResSVDConfig().targets)
    report = compress_(model, ResSVDConfig(ratio=0.2), windows)  # the default: propagation, layers "auto", tune
    assert not report.search and report.layers_compressed == 2 == selection.half_k(per_layer, 0.2)
    assert len(report.tune_loss) == DEFAULT_TUNE_STEPS == report.config["tune_steps"]
    assert report.ranks == selection.last_k_ranks(per_layer, 0.2, 2)
    assert report.corrections and all(c["ridge"] in correction_grid() for c in report.corrections)


def correction_grid():
    from edgepack.toolchain.ressvd import correction

    return correction.RIDGE_GRID


def test_save_reload_export_parity(tiny_model_dir, tmp_path):
    from edgepack.export import onnx_export, parity
    from edgepack.toolchain import sources
    from edgepack.toolchain.compression import compress

    out = tmp_path / "compressed"
    report = compress(str(tiny_model_dir), ResSVDConfig(ratio=0.2, layers=2, calib_windows=4, calib_length=64), out)
    reloaded = sources.load(str(out)).model
    fresh = sources.load(str(tiny_model_dir))
    from edgepack.toolchain.compression import compress_loaded

    compress_loaded(fresh, ResSVDConfig(ratio=0.2, layers=2, calib_windows=4, calib_length=64))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), fresh.model(ids).logits.numpy(), atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == report.params_after
    files = onnx_export.export(reloaded, tmp_path / "onnx")
    assert parity.check(reloaded, files[0], [[5, 6, 7, 8, 9, 10]]).passed


def test_package_of_compressed_folder_records_compression(tiny_model_dir, tmp_path):
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.compression import compress

    folder = tmp_path / "c"
    compress(str(tiny_model_dir), ResSVDConfig(ratio=0.2, layers=2, calib_windows=4, calib_length=64, tune_steps=0),
             folder)
    manifest = build(BuildConfig(model=str(folder)), tmp_path / "pkg")
    assert manifest.plan["compression"]["layers_compressed"] == 2
    assert manifest.parity["float32"]["passed"]
    assert len(load(tmp_path / "pkg").generate("hi", max_new_tokens=3).tokens) >= 1


def test_corrected_factors_undo_upstream_error():
    from edgepack.toolchain.ressvd.sequential import corrected_factors

    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 48, dtype=torch.float64, generator=g)
    x = correlated_inputs()
    distort = torch.eye(48, dtype=torch.float64) + 0.1 * torch.randn(48, 48, dtype=torch.float64, generator=g)
    x_hat = x @ distort  # what the layer sees once earlier layers are compressed
    target = x @ w.T
    a, b = corrected_factors(w, x, x_hat, 48, 1e-4, ridge=0.0)
    naive = float(((target - x_hat @ w.T) ** 2).sum())
    assert float(((target - x_hat @ (a @ b).T) ** 2).sum()) < 1e-6 * naive
    a, b = corrected_factors(w, x, x_hat, 12, 1e-4, ridge=0.0)
    s = factorize.whitening(x_hat.T @ x_hat, 1e-4)
    a0, b0 = factorize.whitened(w, 12, s)
    assert float(((target - x_hat @ (a @ b).T) ** 2).sum()) < float(((target - x_hat @ (a0 @ b0).T) ** 2).sum())


def test_propagation_aware_compression_lowers_output_error():
    """Unregularized, the correction lowers the error on its own calibration windows; on other text the
    ridge chosen on held-out windows keeps it from doing worse than no correction at all (the tiny random
    model's 10 calibration windows are too few for λ = 0 not to overfit)."""
    import tiny

    windows = [list(range(i, i + 32)) for i in range(0, 320, 32)]
    fresh = torch.tensor([list(range(i, i + 32)) for i in range(320, 448, 32)])  # like the calibration text
    errors = {}
    for variant in ("none", 0.0, "auto"):
        model = tiny.make_model(seed=5, layers=4)
        with torch.inference_mode():
            reference = model(torch.tensor(windows[:4])).logits, model(fresh).logits
        ridge = 0.0 if variant == "none" else variant
        compress_(model, ResSVDConfig(ratio=0.3, layers=4, method="svd-llm", propagate=variant != "none", ridge=ridge,
                                      tune_steps=0), windows)
        with torch.inference_mode():
            out = model(torch.tensor(windows[:4])).logits, model(fresh).logits
        errors[variant] = [float(((o - r) ** 2).mean() / (r ** 2).mean()) for o, r in zip(out, reference)]
    assert errors[0.0][0] < 0.5 * errors["none"][0]  # in sample
    assert errors["auto"][1] < errors[0.0][1] and errors["auto"][1] < 1.05 * errors["none"][1]  # out of sample


def test_ridge_chosen_on_held_out_windows_beats_plain_least_squares():
    """Few calibration rows for the dimension: the unregularized map fits noise; the ridge picked on
    held-out windows generalizes better, and is the grid point with the least held-out error."""
    from edgepack.toolchain.ressvd import correction
    from edgepack.toolchain.ressvd.sequential import corrected_factors

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 48, dtype=torch.float64, generator=g)
    distort = torch.eye(48, dtype=torch.float64) + 0.1 * torch.randn(48, 48, dtype=torch.float64, generator=g)

    def sample(n):
        x = correlated_inputs(n=n, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        return x, x @ distort + 0.05 * torch.randn(n, 48, dtype=torch.float64, generator=g)

    x, x_hat = sample(64)
    x, x_hat = x.reshape(8, 8, 48), x_hat.reshape(8, 8, 48)  # 8 windows of 8 tokens: 56 fitting rows for 48 dims
    fresh_x, fresh_hat = sample(4000)

    def fresh_error(ridge):
        a, b = corrected_factors(w, x, x_hat, 48, 1e-4, ridge=ridge)
        return float(((fresh_x @ w.T - fresh_hat @ (a @ b).T) ** 2).sum())

    lam, _, curve = correction.choose_ridge([w], x, x_hat, 1e-4)
    assert set(curve) == set(correction.RIDGE_GRID) and curve[lam] == min(curve.values())
    assert fresh_error("auto") < 0.5 * fresh_error(0.0)


def test_ridge_config_is_validated():
    assert ResSVDConfig(ridge=0.01).ridge == 0.01
    for bad in (-1.0, "big", True):
        with pytest.raises(UsageError, match="ridge"):
            ResSVDConfig(ridge=bad)


def test_factor_tune_lowers_the_distillation_loss():
    """The KD tune trains only the factor pairs, from the propagation's recorded streams, and lowers the
    KL to the dense model on the calibration windows; the dense layers before the first compressed one
    and every non-factor weight stay as they were."""
    import tiny
    from edgepack.toolchain.ressvd import tune
    from edgepack.toolchain.ressvd.sequential import compress_sequential_

    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    model = tiny.make_model(seed=5, layers=4)
    dense = tiny.make_model(seed=5, layers=4)
    per_layer = selection.target_linears(model, ResSVDConfig().targets)
    ranks = selection.last_k_ranks(per_layer, 0.3, 2)
    traces = []
    compress_sequential_(model, ranks, windows, trace=traces)
    (trace,) = traces
    assert trace.first == 2 and trace.inputs.shape == (8, 32, 64)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".0.weight" not in n and ".1.weight" not in n}
    before = tune.distillation_loss(model, trace)
    losses = tune.tune_(model, trace, tune.TuneSettings(steps=30, lr=1e-3, batch=2, positions=16))
    after = tune.distillation_loss(model, trace)
    assert len(losses) == 30 and after < 0.7 * before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.inference_mode():
        ids = torch.tensor(windows[:2])
        reference = dense(ids).logits
        err = float(((model(ids).logits - reference) ** 2).mean())
    assert err > 0  # still a compressed model


def test_compress_with_tune_steps_records_the_loss(model):
    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    report = compress_(model, ResSVDConfig(ratio=0.3, layers=2, tune_steps=5, tune_lr=1e-3, tune_batch=2), windows)
    assert len(report.tune_loss) == 5 and report.config["tune_steps"] == 5
    assert all(p.requires_grad for p in model.parameters())  # the tune restores requires_grad


def test_tune_options_round_trip_and_are_validated():
    config = ResSVDConfig(tune_steps=40, tune_lr=3e-4, tune_batch=2, tune_bf16=False)
    assert ResSVDConfig.from_dict(config.to_dict()) == config
    # The default tunes where it can (propagation) and nowhere else; an old record without tune_bf16 still loads.
    assert ResSVDConfig().tune_steps == DEFAULT_TUNE_STEPS and ResSVDConfig().tune_bf16
    assert ResSVDConfig(propagate=False).tune_steps == 0 == ResSVDConfig(method="svd").tune_steps
    old = {k: v for k, v in ResSVDConfig(tune_steps=0).to_dict().items() if k != "tune_bf16"}
    assert ResSVDConfig.from_dict(old).tune_steps == 0
    for bad in (dict(tune_steps=-1), dict(tune_steps=2.5), dict(tune_steps=True), dict(tune_lr=0.0),
                dict(tune_batch=0), dict(tune_steps=4, propagate=False), dict(tune_steps=4, method="svd"),
                dict(tune_bf16="yes")):
        with pytest.raises(UsageError):
            ResSVDConfig(**bad)


def test_held_out_error_from_moments_equals_the_direct_error():
    from edgepack.toolchain.ressvd import correction

    g = torch.Generator().manual_seed(0)
    x = correlated_inputs(n=300, dim=20)
    x_hat = x + 0.1 * torch.randn(300, 20, dtype=torch.float64, generator=g)
    w = [torch.randn(7, 20, dtype=torch.float64, generator=g), torch.randn(5, 20, dtype=torch.float64, generator=g)]
    maps = [a + 0.1 * torch.randn(a.shape, dtype=torch.float64, generator=g) for a in w]
    direct = (sum(float(((x @ a.T - x_hat @ b.T) ** 2).sum()) for a, b in zip(w, maps))
              / sum(float(((x @ a.T) ** 2).sum()) for a in w))
    held = correction.HeldOut(w, correction.Moments.of(x, x_hat, dense_gram=True))
    assert held.error(maps) == pytest.approx(direct, rel=1e-9)


def test_narrow_group_correction_from_its_dense_product_equals_the_moments_one():
    """A layer narrower than its input (down) takes W·C from its dense outputs instead of C: the same map."""
    from edgepack.toolchain.ressvd.sequential import _fit_group, corrected_factors

    g = torch.Generator().manual_seed(1)
    x = correlated_inputs(n=400, dim=24).float()
    x_hat = x + 0.05 * torch.randn(x.shape, generator=g)
    w = torch.randn(8, 24, generator=g)
    ref = corrected_factors(w, x, x_hat, 6, 1e-4, ridge=0.1)
    (new,), _, _ = _fit_group([w], x, x_hat, [6], 1e-4, None, 0.1, product=x @ w.T)
    torch.testing.assert_close(new[0] @ new[1], ref[0] @ ref[1], rtol=1e-3, atol=5e-5)  # float32 rounding of X·Wᵀ


def test_compress_cli_ridge_and_default_tune(tiny_model_dir, tmp_path, capsys):
    import json

    from edgepack.runtime import cli

    for bad in ("abc", "-1"):
        code = cli.main(["compress", str(tiny_model_dir), "--ratio", "0.2", "--ridge", bad, "-o", str(tmp_path / "x")])
        assert code == 2
        assert "ridge" in capsys.readouterr().err and not (tmp_path / "x").exists()
    out = tmp_path / "c"
    assert cli.main(["compress", str(tiny_model_dir), "--ratio", "0.2", "--layers", "2", "--ridge", "0.1",
                     "-o", str(out)]) == 0
    record = json.loads((out / "edgepack_compression.json").read_text())
    assert record["config"]["ridge"] == 0.1 and all(c["ridge"] == 0.1 for c in record["corrections"])
    assert record["config"]["tune_steps"] == DEFAULT_TUNE_STEPS == len(record["tune_loss"])


_FAULTS_SCRIPT = """
import json, resource, torch
from edgepack.toolchain.ressvd.allocator import freed_memory_kept

def faults(rounds=10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = torch.ones(16 << 20)  # 64 MB, above glibc's mmap threshold
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()  # every round maps fresh pages and faults them in
with freed_memory_kept() as applied:
    kept = faults()  # after a round or a few that grow the heap, the same block comes back
print(json.dumps([applied, kept, plain]))
"""


def test_freed_memory_kept_reuses_large_blocks_without_page_faults():
    # A fresh process: the allocator state an earlier test leaves behind (a heap grown by a compression)
    # can serve the plain rounds without faults too, and the comparison then says nothing.
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    applied, kept, plain = json.loads(out.stdout.strip().splitlines()[-1])
    assert applied and kept < plain / 2, (kept, plain)


def test_final_norm_of_a_model_whose_base_model_is_itself():
    """Gemma 3's base_model_prefix names a multimodal wrapper's attribute, so base_model is the LM itself."""
    from edgepack.toolchain.ressvd.tune import _final_norm
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert model.base_model is model
    assert _final_norm(model) is model.model.norm
