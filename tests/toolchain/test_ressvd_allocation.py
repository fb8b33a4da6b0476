import pytest
import torch
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.ressvd import ResSVDConfig, compress_, selection
from edgepack.toolchain.ressvd.allocation import allocate, energy_spectrum


@pytest.fixture
def tiny_model():
    import tiny

    return tiny.make_model(seed=5, layers=4)


def _cost(shapes, ranks):
    return sum(r * (o + i) for (o, i), r in zip(shapes, ranks))


def test_energy_spectrum_is_the_whitened_singular_values_squared():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    for shape in ((16, 24), (40, 24)):  # both branches: out <= in and out > in
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        s = torch.linalg.cholesky(x.T @ x)
        expected = torch.linalg.svdvals(w @ s) ** 2
        got = energy_spectrum(w, x.T @ x)[: len(expected)]
        torch.testing.assert_close(got, expected / expected.sum(), atol=1e-9, rtol=1e-6)


def test_allocation_moves_rank_to_the_flat_spectrum_within_the_budget():
    shapes = [(64, 64), (64, 64)]
    fast = torch.logspace(0, -8, 64, dtype=torch.float64)  # energy in a few components
    flat = torch.ones(64, dtype=torch.float64)
    spectra = [fast / fast.sum(), flat / flat.sum()]
    uniform = [16, 16]
    ranks = allocate(shapes, spectra, uniform, floor=0.5, multiple=8)
    assert ranks[0] == 8 and ranks[1] == 24  # the floor keeps the fast one; the flat one gets the rest
    assert _cost(shapes, ranks) <= _cost(shapes, uniform)


def test_allocation_never_exceeds_budget_or_the_useful_rank():
    g = torch.Generator().manual_seed(1)
    shapes = [(96, 32), (32, 96), (48, 48), (8, 200)]
    spectra = []
    for o, i in shapes:
        v = torch.rand(min(o, i), generator=g, dtype=torch.float64).sort(descending=True).values
        spectra.append(v / v.sum())
    for uniform in ([4, 4, 4, 2], [20, 20, 20, 7], [1, 1, 1, 1]):
        ranks = allocate(shapes, spectra, uniform)
        assert _cost(shapes, ranks) <= _cost(shapes, uniform)
        assert all(1 <= r <= o * i // (o + i) for r, (o, i) in zip(ranks, shapes))


def test_spectrum_allocation_keeps_each_layers_parameters(tiny_model):
    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    per_layer = selection.target_linears(tiny_model, ResSVDConfig().targets)
    uniform = selection.last_k_ranks(per_layer, 0.2, selection.half_k(per_layer, 0.2))
    report = compress_(tiny_model, ResSVDConfig(ratio=0.2, allocation="spectrum", tune_steps=0), windows)
    assert set(report.ranks) == set(uniform) and report.ranks != uniform
    modules = dict(m for layer in per_layer for m in layer)
    for prefix in {n.rsplit(".", 2)[0] for n in uniform}:
        names = [n for n in uniform if n.startswith(prefix + ".")]
        shapes = [tuple(modules[n].weight.shape) for n in names]
        assert _cost(shapes, [report.ranks[n] for n in names]) <= _cost(shapes, [uniform[n] for n in names])
    for name, rank in report.ranks.items():
        assert tiny_model.get_submodule(name)[0].out_features == rank
    assert report.removed_share >= 0.2 - 1e-9


def test_spectrum_allocation_is_validated():
    with pytest.raises(UsageError, match="allocation"):
        ResSVDConfig(allocation="greedy")
    with pytest.raises(UsageError, match="allocation spectrum needs"):
        ResSVDConfig(allocation="spectrum", propagate=False)
    assert ResSVDConfig.from_dict(ResSVDConfig(allocation="spectrum").to_dict()).allocation == "spectrum"


def test_unequal_ranks_export_with_parity(tiny_model_dir, tmp_path):
    """q/k/v (and gate/up) of one layer at different ranks still pack into the fused graph's joint ops."""
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.compression import compress

    folder = tmp_path / "c"
    report = compress(str(tiny_model_dir), ResSVDConfig(ratio=0.2, calib_windows=4, calib_length=64, tune_steps=0,
                                                         allocation="spectrum"), folder)
    last = max(report.ranks, key=lambda n: int(n.split(".layers.")[1].split(".")[0])).rsplit(".", 2)[0]
    layer = {n.rsplit(".", 1)[-1]: r for n, r in report.ranks.items() if n.startswith(last + ".")}
    assert len({layer["q_proj"], layer["k_proj"], layer["v_proj"]}) > 1 or layer["gate_proj"] != layer["up_proj"]
    for int4 in (False, True):
        manifest = build(BuildConfig(model=str(folder), int4=int4), tmp_path / f"pkg{int4}")
        assert manifest.parity["float32"]["passed"]  # the int4 row reports rounding, not a pass
        assert len(load(tmp_path / f"pkg{int4}").generate("hi", max_new_tokens=3).tokens) >= 1
