"""``build --device``: plan for the device, then build exactly that plan."""

from __future__ import annotations

from pathlib import Path

from edgepack.runtime.manifest import Manifest
from edgepack.runtime.profiles import load_profile
from edgepack.toolchain.planner.plan import Plan, plan_for


def build_for_device(model: str, device: str, output: Path | str, context: int | None = None,
                     calib: str | None = None, method: str = "ressvd",
                     delta_slots: bool = False) -> tuple[Plan, Manifest]:
    """Plan, then build: on the plan's graph (fused for the architectures it supports; else optimum's,
    where int4 plans get the all-int4 device layout), compressed plans ResSVD at the plan's ranks, phone
    profiles the .ort format as well; ``delta_slots`` as ``build --delta-slots`` (rank-0 side branches
    hold no memory, so the plan is the same)."""
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.ressvd import ResSVDConfig

    profile = load_profile(device)
    plan = plan_for(model, profile, context)
    compression = ResSVDConfig(method=method, rank_map=plan.ranks) if plan.ranks else None
    int4 = plan.dtype == "int4"
    config = BuildConfig(model=model, int4=int4, context=plan.context, compression=compression, calib=calib,
                         graph=plan.graph, int4_all=int4 and plan.graph == "optimum", ort_format=profile.mobile,
                         device_plan=plan.to_dict(), delta_slots=delta_slots)
    return plan, build(config, output)
