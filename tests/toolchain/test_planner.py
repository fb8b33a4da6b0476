"""The planner on a tiny shape with made-up budgets."""

import json

import pytest
from edgepack.runtime import memory
from edgepack.runtime.profiles import DeviceProfile
from edgepack.toolchain.planner import Plan, PlanError, make_plan
from edgepack.toolchain.planner.plan import candidates

SHAPE = memory.ModelShape(layers=4, hidden=256, intermediate=768, heads=4, kv_heads=2, head_dim=64, vocab=4096)
MB = 1 << 20


def device(budget_mb: float, storage_mb: float = 10_000) -> DeviceProfile:
    return DeviceProfile(name="made-up", description="test", kind="sbc", ram_mb=100_000, app_memory_mb=budget_mb,
                         storage_mb=storage_mb, cores=1, cpu="x", arch="x")


def test_roomy_device_gets_float32_uncompressed():
    plan = make_plan(SHAPE, device(10_000), context=256)
    assert (plan.dtype, plan.ratio, plan.ranks) == ("float32", 0.0, {})
    assert plan.peak_bytes <= plan.budget_bytes


def test_smaller_budget_never_gives_a_larger_package():
    peaks = sorted({c.estimate.peak for c in candidates(SHAPE, 256)})
    budgets = sorted({p / MB + d for p in peaks for d in (-0.01, 0.0, 0.01)}, reverse=True)
    sizes, costs = [], []
    for b in budgets:
        try:
            plan = make_plan(SHAPE, device(b), context=256)
        except PlanError:
            continue
        assert plan.peak_bytes <= b * MB
        sizes.append(plan.package_bytes)
        costs.append(plan.expected_ppl_ratio)
    assert len(set(sizes)) > 2, "the budgets should walk through several plans"
    assert sizes == sorted(sizes, reverse=True) and costs == sorted(costs)


def test_compressed_plan_has_last_k_ranks():
    frontier = candidates(SHAPE, 256)
    compressed = next(c for c in frontier if c.ratio > 0)
    plan = make_plan(SHAPE, device(compressed.estimate.peak / MB), context=256)
    assert plan.k >= 1 and plan.ranks
    layers = {int(n.split(".")[2]) for n in plan.ranks}
    assert layers == set(range(SHAPE.layers - plan.k, SHAPE.layers))


def test_storage_limit_is_respected():
    limit = candidates(SHAPE, 256)[0].size / MB / 2  # half of the float32 package
    plan = make_plan(SHAPE, device(10_000, storage_mb=limit), context=256)
    assert plan.package_bytes <= limit * MB and plan.dtype == "int4"


def test_impossible_device_is_refused_with_figures():
    with pytest.raises(PlanError, match=r"smallest plan \(int4, ResSVD 40%.*needs [\d.]+ MiB peak memory.*"
                                        r"allows 1 MiB of memory"):
        make_plan(SHAPE, device(1), model="tiny")


def test_context_is_halved_only_when_not_given():
    small = candidates(SHAPE, 256)[0].estimate.peak / MB + 0.1
    plan = make_plan(SHAPE, device(small), max_context=2048)
    assert plan.context < 2048 and plan.notes
    with pytest.raises(PlanError):
        make_plan(SHAPE, device(small * 0.5), context=2048)


def test_plan_round_trips_through_json():
    plan = make_plan(SHAPE, device(10_000), context=256)
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
