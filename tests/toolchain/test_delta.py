"""OSD deltas in the toolchain: budget arithmetic, selection, extraction checks and the file format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgepack.runtime import delta_file
from edgepack.runtime.errors import IntegrityError, PackageError, UsageError
from edgepack.toolchain.delta import budget, extract, factorize, importance
from edgepack.toolchain.delta.make import DeltaConfig, compress, make


def test_truncsvd_budget_is_the_paper_formula():
    assert budget.dense_bits(576, 1536, 2) == 32 * 2 * (576 + 1536)
    # an index into a 576x4 factor needs ceil(log2(2304)) = 12 bits
    assert budget.entry_bits(576, 1536, 4) == (32 + 12, 32 + 13)
    assert budget.sparse_bits(576, 1536, 4, 10, 20) == 10 * 44 + 20 * 45


@pytest.mark.parametrize("seed", range(5))
def test_sparse_selection_never_exceeds_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    n_out, n_in, r, k = 48, 80, 2, 5
    u, v = torch.randn(n_out, k, generator=gen), torch.randn(n_in, k, generator=gen)
    allowed = budget.dense_bits(n_out, n_in, r)
    layer = factorize.sparse_layer("x", u, v, u.abs(), v.abs(), allowed)
    assert layer.bits <= allowed
    # and it is not wasteful: one more entry of the cheaper kind would not fit
    assert allowed - layer.bits < max(budget.entry_bits(n_out, n_in, k))
    assert layer.bits == budget.sparse_bits(n_out, n_in, k, layer.u.kept, layer.v.kept)


def test_selection_keeps_the_highest_scores():
    score_u = np.array([5.0, 1.0, 9.0, 0.5])
    score_v = np.array([3.0, 8.0])
    keep_u, keep_v = factorize.select(score_u, score_v, 10, 10, budget_bits=30)
    assert keep_u.tolist() == [0, 2] and keep_v.tolist() == [1]


def test_svd_factors_reconstruct_a_low_rank_delta():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(30, 3, generator=gen) @ torch.randn(3, 20, generator=gen)
    u, v = factorize.svd_factors(delta, 3)
    torch.testing.assert_close(u @ v.T, delta, atol=1e-4, rtol=1e-4)
    assert torch.allclose(u.norm(dim=0), v.norm(dim=0), rtol=1e-4)  # √σ on each side


def test_osd_keeps_entries_that_matter_to_the_loss_where_magnitude_does_not():
    # U has a large entry the loss does not care about (zero gradient) and a small one it does.
    u = torch.tensor([[10.0], [0.1]])
    v = torch.tensor([[1.0], [1.0]])
    grad = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    score_u, score_v = importance.taylor_scores(u, v, grad)
    assert score_u[1, 0] > score_u[0, 0]
    budget_bits = 2 * (32 + budget.index_bits(2))  # room for two entries
    osd = factorize.sparse_layer("x", u, v, score_u, score_v, budget_bits)
    mag = factorize.sparse_layer("x", u, v, u.abs(), v.abs(), budget_bits)
    assert 1 in osd.u.index.tolist() and 1 not in mag.u.index.tolist()


def test_extract_refuses_mismatched_models(tiny_model_dir):
    import tiny  # tests/ is on sys.path (conftest)

    base = tiny.make_model(0, layers=2)
    with pytest.raises(UsageError, match="different parameters"):
        extract.extract(base, tiny.make_model(0, layers=3))
    wide = tiny.make_model(0)
    wide.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(UsageError, match="same size"):
        extract.extract(base, wide)


def test_identical_models_have_no_delta():
    import tiny

    base = tiny.make_model(0)
    with pytest.raises(UsageError, match="identical"):
        compress(base, extract.extract(base, tiny.make_model(0)), DeltaConfig(method="truncsvd"), [])


def test_fingerprint_follows_the_values():
    import tiny

    a, b = tiny.make_model(0), tiny.make_model(0)
    assert extract.fingerprint(a) == extract.fingerprint(b)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert extract.fingerprint(a) != extract.fingerprint(b)


@pytest.mark.parametrize("method", ["truncsvd", "magtruncsvd", "osd"])
def test_delta_file_round_trip(tiny_model_dir, tiny_finetune_dir, tmp_path, method):
    valid = tmp_path / "valid.txt"
    from pydoc_data.topics import topics

    valid.write_text(" ".join(list(topics.values())[20:30]))
    delta = make(str(tiny_model_dir), str(tiny_finetune_dir),
                 DeltaConfig(method=method, rank=2, valid=str(valid), windows=2, window_tokens=64))
    assert delta.bits <= delta.info["budget_bits"]
    assert len(delta.layers) == 14  # 2 layers x q k v o gate up down
    path = tmp_path / "d.safetensors"
    delta_file.write(delta, path)
    back = delta_file.read(path)
    assert back.base_fingerprint == delta.base_fingerprint
    for name, layer in delta.layers.items():
        np.testing.assert_array_equal(back.layers[name].matrix(), layer.matrix())
        if method != "truncsvd":
            np.testing.assert_array_equal(back.layers[name].u.index, layer.u.index)
    if method == "osd":  # OSD's default: Fisher of the KL to the fine-tune, gradient at the base, one global budget
        assert "fisher" in back.info["importance"] and "at the base" in back.info["importance"]
        assert "KL(fine-tune ‖ model)" in back.info["importance"]
        assert (back.info["gradient_at"], back.info["allocation"]) == ("base", "global")


def test_osd_without_validation_text_says_it_falls_back(tiny_model_dir, tiny_finetune_dir, capsys):
    delta = make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="osd", rank=1))
    assert "fallback" in delta.info["importance"]
    assert "falls back" in capsys.readouterr().err


def _tiny_delta(tiny_model_dir, tiny_finetune_dir, tmp_path):
    delta = make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="magtruncsvd", rank=1))
    path = tmp_path / "d.safetensors"
    delta_file.write(delta, path, value_dtype="float16")
    return path


def test_corrupt_delta_files_are_refused(tiny_model_dir, tiny_finetune_dir, tmp_path):
    path = _tiny_delta(tiny_model_dir, tiny_finetune_dir, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the tensor data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum"):
        delta_file.read(bad)
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(PackageError):
        delta_file.read(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(PackageError, match="header length"):
        delta_file.read(tmp_path / "huge.safetensors")
    with pytest.raises(PackageError, match="does not exist"):
        delta_file.read(tmp_path / "missing.safetensors")


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="--method"):
        DeltaConfig(method="lora")
    with pytest.raises(UsageError, match="--rank"):
        DeltaConfig(rank=0)
    assert DeltaConfig(method="osd", rank=2).factor_rank == 4
    assert DeltaConfig(method="osd", rank=2, relax=1).factor_rank == 3


def test_global_allocation_spends_one_budget_where_scores_are_high():
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for name, weight in (("loud", 100.0), ("quiet", 0.01)):
        u, v = torch.randn(40, 4, generator=gen), torch.randn(30, 4, generator=gen)
        layers[name] = (u, v, u.abs() * weight, v.abs() * weight)
    per_layer = budget.dense_bits(40, 30, 2)
    chosen = factorize.select_global(layers, 2 * per_layer)
    assert sum(layer.bits for layer in chosen.values()) <= 2 * per_layer
    assert chosen["loud"].bits > per_layer > chosen["quiet"].bits  # the budget moved to where it matters


def test_output_scores_weight_entries_by_their_inputs():
    u = torch.ones(2, 1)
    v = torch.ones(3, 1)
    gram = torch.diag(torch.tensor([100.0, 1.0, 0.0]))  # input feature 0 carries the energy, 2 none
    score_u, score_v = importance.output_scores(u, v, gram)
    assert score_v[0, 0] > score_v[1, 0] > score_v[2, 0] == 0
    assert torch.allclose(score_u, torch.full_like(score_u, 101.0))


def test_auto_records_its_trials_and_keeps_the_budget(tiny_model_dir, tiny_finetune_dir, tmp_path):
    from pydoc_data.topics import topics

    valid = tmp_path / "valid.txt"
    valid.write_text(" ".join(list(topics.values())[20:30]))
    delta = make(str(tiny_model_dir), str(tiny_finetune_dir),
                 DeltaConfig(method="osd", rank=1, valid=str(valid), windows=2, window_tokens=32, auto=True))
    trials = delta.info["auto"]
    assert len(trials) == 6 and delta.bits <= delta.info["budget_bits"]
    best = min(trials, key=lambda t: t["validation_loss"])
    assert (delta.info["relax"], delta.info["allocation"]) == (best["relax"], best["allocation"])


@pytest.mark.parametrize("values", ["float16", "int8"])
def test_smaller_value_types_stay_close(tiny_model_dir, tiny_finetune_dir, tmp_path, values):
    delta = make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="magtruncsvd", rank=2))
    full = delta_file.write(delta, tmp_path / "f32.safetensors", "float32")
    small = delta_file.write(delta, tmp_path / "small.safetensors", values)
    assert small < full
    back = delta_file.read(tmp_path / "small.safetensors")
    for name, layer in delta.layers.items():
        exact = layer.matrix()
        err = np.abs(back.layers[name].matrix() - exact).max() / np.abs(exact).max()
        assert err < (2e-3 if values == "float16" else 3e-2)


def test_whitened_factors_fit_the_layer_outputs_better():
    """On inputs with very unequal feature scales, the whitened rank-1 factors of a delta give a
    smaller output error ‖(ΔW − U·Vᵀ)·X‖ than the plain ones, though a larger weight error."""
    from edgepack.toolchain.ressvd.factorize import whitening

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen, dtype=torch.float64) * torch.logspace(1, -2, 12, dtype=torch.float64)
    delta = torch.randn(10, 12, generator=gen)
    s = whitening(x.T @ x, 1e-6)
    plain = factorize.svd_factors(delta, 1)
    white = factorize.svd_factors(delta, 1, whiten=s)

    def out_err(f):
        return ((delta.double() - (f[0] @ f[1].T).double()) @ x.T).norm()

    def w_err(f):
        return (delta - f[0] @ f[1].T).norm()

    assert out_err(white) < out_err(plain) and w_err(white) > w_err(plain)


def test_refit_lowers_the_weight_error_with_the_same_entries():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(40, 6, generator=gen) @ torch.randn(6, 30, generator=gen)
    u, v = factorize.svd_factors(delta, 4)
    layer = factorize.sparse_layer("x", u, v, u.abs(), v.abs(), budget.dense_bits(40, 30, 2))
    fitted = factorize.refit(delta, layer)
    assert fitted.bits == layer.bits
    np.testing.assert_array_equal(fitted.u.index, layer.u.index)
    before = np.linalg.norm(delta.numpy() - layer.matrix())
    after = np.linalg.norm(delta.numpy() - fitted.matrix())
    assert after < before


def test_merged_adds_the_delta_and_restores_the_weights(tiny_model_dir, tiny_finetune_dir):
    from edgepack.toolchain import sources
    from edgepack.toolchain.delta.merge import merged

    delta = make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="truncsvd", rank=2))
    model = sources.load(str(tiny_model_dir)).model
    name = next(iter(delta.layers))
    weight = dict(model.named_modules())[name].weight
    before = weight.detach().clone()
    with merged(model, delta):
        np.testing.assert_allclose((weight - before).detach().numpy(), delta.layers[name].matrix(), atol=1e-6)
    torch.testing.assert_close(weight.detach(), before, rtol=0, atol=0)
