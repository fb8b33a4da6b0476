"""OSD's gradient scores beyond the paper's one batch-mean gradient: the per-window (empirical Fisher)
statistics, where the gradient is taken, and per-layer normalization."""

from __future__ import annotations

import pytest
import torch
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import budget, extract, factorize, importance
from edgepack.toolchain.delta.make import DeltaConfig, compress


def test_fisher_keeps_entries_whose_window_gradients_cancel():
    # Entry 1 of U matters to each window's loss, in opposite directions: the batch-mean gradient is
    # zero there, so |θ·ḡ| calls it unimportant; θ²·Σ_w g_w² does not. Entry 0 is larger but flat.
    u = torch.tensor([[1.0], [0.5]])
    v = torch.tensor([[1.0], [1.0]])
    windows = [torch.tensor([[0.1, 0.0], [4.0, 4.0]]), torch.tensor([[0.1, 0.0], [-4.0, -4.0]])]
    mean = sum(windows) / 2
    sq_u = sum((g @ v).square() for g in windows)
    sq_v = sum((g.T @ u).square() for g in windows)
    taylor_u, _ = importance.taylor_scores(u, v, mean)
    fisher_u, fisher_v = importance.fisher_scores(u, v, sq_u, sq_v)
    assert taylor_u[1, 0] == 0 < taylor_u[0, 0]
    assert fisher_u[1, 0] > fisher_u[0, 0]
    room = 32 + budget.index_bits(2)  # one entry of U fits
    zero_v = torch.zeros_like(fisher_v)
    assert factorize.sparse_layer("x", u, v, fisher_u, zero_v, room).u.index.tolist() == [1]
    assert factorize.sparse_layer("x", u, v, taylor_u, zero_v, room).u.index.tolist() == [0]
    rms_u, _ = importance.rms_scores(u, v, sq_u, sq_v)
    torch.testing.assert_close(rms_u.square(), fisher_u)  # same ranking, |θ·g| scale


def _tiny_pair():
    import tiny

    base, ft = tiny.make_model(0), tiny.make_model(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            if p.ndim == 2 and p.shape[0] != ft.config.vocab_size:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return base, extract.extract(base, ft)


def test_per_window_statistics_match_the_batch_gradient():
    base, raw = _tiny_pair()
    layers = {n: m for n, m in extract.linear_layers(base).items() if n in raw.linears}
    factors = {n: factorize.svd_factors(d, 2) for n, d in raw.linears.items()}
    shifts = {n: u @ v.T for n, (u, v) in factors.items()}
    windows = [list(range(3, 19)), list(range(40, 56)), list(range(7, 23))]
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    stats = importance.factor_gradient_stats(base, layers, shifts, factors, windows)
    grads = importance.weight_gradients(base, layers, shifts, windows)
    for name, (u, v) in factors.items():
        mean_u, mean_v, sq_u, sq_v = stats[name]
        torch.testing.assert_close(mean_u, grads[name] @ v, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(mean_v, grads[name].T @ u, atol=1e-6, rtol=1e-4)
        assert bool((sq_u >= len(windows) * mean_u.square() * (1 - 1e-4) - 1e-12).all())  # Σg² ≥ n·ḡ²
        assert torch.equal(layers[name].weight, before[name])  # the shift is undone


@pytest.mark.parametrize("importance_kind,gradient_at,normalize", [
    ("fisher", "delta", False), ("rms", "finetune", True), ("taylor", "base", True), ("fisher", "finetune", False)])
def test_gradient_variants_stay_in_budget(importance_kind, gradient_at, normalize):
    base, raw = _tiny_pair()
    windows = [list(range(3, 35)), list(range(50, 82))]
    for allocation in ("layer", "global"):
        config = DeltaConfig(method="osd", rank=1, importance=importance_kind, gradient_at=gradient_at,
                             normalize=normalize, allocation=allocation, tune_steps=0)  # the tune: test_delta_tune
        delta = compress(base, raw, config, windows)
        assert delta.bits <= delta.info["budget_bits"] + 32 * sum(a.size for a in raw.dense.values())
        assert importance_kind in delta.info["importance"] and delta.info["gradient_at"] == gradient_at


def test_normalized_scores_have_mean_one_per_layer():
    scores = {"a": (torch.tensor([1e-6, 3e-6]), torch.tensor([2e-6])), "b": (torch.tensor([5.0]), torch.tensor([1.0]))}
    for su, sv in importance.normalized(scores).values():
        assert abs(float((su.sum() + sv.sum()) / (su.numel() + sv.numel())) - 1) < 1e-6


def test_shrinking_fisher_moves_from_per_entry_to_magnitude_order():
    u = torch.tensor([[3.0], [1.0], [2.0]])
    v = torch.tensor([[1.0]])
    sq_u = torch.tensor([[0.01], [9.0], [0.01]])  # the smallest entry has by far the largest Fisher
    sq_v = torch.tensor([[1.0]])
    raw, _ = importance.fisher_scores(u, v, sq_u, sq_v)
    assert int(raw.argmax()) == 1
    shrunk, _ = importance.fisher_scores(u, v, sq_u, sq_v, shrink=1e6)
    assert shrunk.ravel().argsort().tolist() == u.abs().ravel().argsort().tolist()


def test_bad_gradient_options_are_usage_errors():
    with pytest.raises(UsageError, match="gradient-at"):
        DeltaConfig(method="osd", gradient_at="midway")
    with pytest.raises(UsageError, match="shrink"):
        DeltaConfig(method="osd", importance="fisher", shrink=-1.0)
    with pytest.raises(UsageError, match="global"):
        DeltaConfig(method="osd", importance="output", allocation="global")


def test_kl_importance_uses_the_kl_to_the_finetune():
    # The window loss is KL(fine-tune ‖ model): at the fine-tune itself it is at its minimum, so the
    # gradient there vanishes, while at the base it does not (the NLL of the text has no such zero).
    from edgepack.toolchain.delta import make

    base, raw = _tiny_pair()
    layers = {n: m for n, m in extract.linear_layers(base).items() if n in raw.linears}
    windows = [list(range(3, 19)), list(range(40, 56))]
    loss_fn = make._kl_to_finetune(base, raw, windows, {})
    zero = {n: torch.zeros(()) for n in layers}
    at_base = importance.weight_gradients(base, layers, zero, windows, loss_fn=loss_fn)
    at_ft = importance.weight_gradients(base, layers, dict(raw.linears), windows, loss_fn=loss_fn)
    nll_at_ft = importance.weight_gradients(base, layers, dict(raw.linears), windows)
    big = max(float(g.abs().max()) for g in at_base.values())
    assert big > 0
    assert max(float(g.abs().max()) for g in at_ft.values()) < 1e-3 * big
    assert max(float(g.abs().max()) for g in nll_at_ft.values()) > 1e-2 * big


def test_separable_fisher_keeps_row_and_column_structure_and_averages_the_rest():
    rows, cols = torch.tensor([1.0, 4.0, 0.5]), torch.tensor([2.0, 0.25])
    exact = torch.outer(rows, cols)
    u, v = torch.ones(3, 2), torch.ones(4, 2)
    kept, _ = importance.fisher_scores(u, v, exact, torch.ones(4, 2), separable=True)
    torch.testing.assert_close(kept, exact)  # a separable Fisher is left as it is
    noisy = exact.clone()
    noisy[0, 0] = 100.0  # one entry's estimate far off
    smoothed, _ = importance.fisher_scores(u, v, noisy, torch.ones(4, 2), separable=True)
    torch.testing.assert_close(smoothed.sum(), noisy.sum())  # the factor's total is kept
    assert smoothed[0, 0] < noisy[0, 0] and smoothed[1, 0] > noisy[1, 0]
    zero, _ = importance.fisher_scores(u, v, torch.zeros(3, 2), torch.ones(4, 2), separable=True)
    assert not zero.any()


def test_separable_osd_stays_in_budget_and_says_so():
    base, raw = _tiny_pair()
    windows = [list(range(3, 35)), list(range(50, 82))]
    delta = compress(base, raw, DeltaConfig(method="osd", rank=1, separable=True, tune_steps=0), windows)
    assert delta.bits <= delta.info["budget_bits"] + 32 * sum(a.size for a in raw.dense.values())
    assert "separable" in delta.info["importance"]
    with pytest.raises(UsageError, match="separable"):
        DeltaConfig(method="magtruncsvd", separable=True)


def test_kl_importance_stays_in_budget_and_says_so():
    base, raw = _tiny_pair()
    windows = [list(range(3, 35)), list(range(50, 82))]
    delta = compress(base, raw, DeltaConfig(method="osd", rank=1, importance="fisher-kl", tune_steps=0), windows)
    assert delta.info["allocation"] == "global"  # its scores estimate a loss change: comparable across layers
    assert delta.bits <= delta.info["budget_bits"] + 32 * sum(a.size for a in raw.dense.values())
    assert "KL(fine-tune" in delta.info["importance"]


def test_true_fisher_labels_are_drawn_from_the_model_and_its_gradient_has_zero_mean():
    # The sampled-label loss is seeded per window (repeatable scores), and E[∇log p(y)] = 0 under the
    # model's own distribution: the mean gradient over many draws is far smaller than one draw's.
    base, _ = _tiny_pair()
    ids = torch.tensor([list(range(3, 35))])
    one = importance.sampled_nll(base, samples=1)
    assert float(one(0, ids)) == float(one(0, ids)) and float(one(0, ids)) != float(one(1, ids))
    layer = extract.linear_layers(base)["model.layers.0.mlp.down_proj"]
    grads = []
    for draws in (1, 512):
        layer.weight.requires_grad_(True)
        importance.sampled_nll(base, samples=draws)(0, ids).backward()
        grads.append(float(layer.weight.grad.norm()))
        layer.weight.grad = None
        layer.weight.requires_grad_(False)
    assert grads[1] < 0.25 * grads[0]


@pytest.mark.parametrize("gradient_at", ["finetune", "delta"])
def test_true_fisher_stays_in_budget_and_says_so(gradient_at):
    base, raw = _tiny_pair()
    windows = [list(range(3, 35)), list(range(50, 82))]
    config = DeltaConfig(method="osd", rank=1, importance="fisher-true", gradient_at=gradient_at, tune_steps=0)
    delta = compress(base, raw, config, windows)
    assert delta.info["allocation"] == "global"
    assert delta.bits <= delta.info["budget_bits"] + 32 * sum(a.size for a in raw.dense.values())
    assert "true Fisher" in delta.info["importance"]
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    compress(base, raw, config, windows)
    assert all(torch.equal(p, weights[n]) for n, p in base.named_parameters())
