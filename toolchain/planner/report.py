"""A plan as the few lines ``edgepack plan`` prints."""

from __future__ import annotations

from edgepack.runtime.profiles import MB, DeviceProfile
from edgepack.toolchain.planner.plan import Plan


def describe(plan: Plan, profile: DeviceProfile) -> str:
    m = plan.memory
    lines = [
        f"device       {profile.name}: {profile.description}",
        f"dtype        {plan.dtype}" + _layout(plan),
        f"graph        {plan.graph}" + (" (edgepack's own)" if plan.graph == "fused" else " (optimum's export)"),
        "compression  " + (f"ResSVD {plan.ratio:.0%} of decoder linear parameters, last k={plan.k} layers, "
                            f"ranks {_ranks(plan)}" if plan.ranks else "none"),
        f"context      {plan.context} tokens (prefill chunks of up to {m.get('chunk')} tokens)",
        f"peak memory  {plan.peak_bytes / MB:.0f} MiB predicted of {plan.budget_bytes / MB:.0f} MiB budget "
        f"({plan.peak_bytes / plan.budget_bytes:.0%}): runtime {m['runtime'] / MB:.0f}, weights "
        f"{(m['weights'] + m['folded']) / MB:.0f}, KV cache {m['kv_cache'] / MB:.0f}, activations "
        f"{m['activations'] / MB:.0f} MiB",
        f"size         {plan.package_bytes / MB:.1f} MiB of weights" + (" (twice: model.onnx and model.ort)"
                                                                       if profile.mobile else "")
        + f", storage limit {plan.storage_bytes / MB:.0f} MiB",
        f"quality      expected perplexity ×{plan.expected_ppl_ratio:.2f} of float32 ({plan.quality_basis})",
    ]
    lines += [f"note         {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"


def _ranks(plan: Plan) -> str:
    by_kind: dict[str, set[int]] = {}
    for name, rank in plan.ranks.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], set()).add(rank)
    return ", ".join(f"{k} {'/'.join(map(str, sorted(v)))}" for k, v in by_kind.items())


def _layout(plan: Plan) -> str:
    if plan.dtype != "int4":
        return ""
    if plan.graph == "fused":
        return " (linear layers; embedding and LM head one 8-bit table when tied)"
    return " (every weight, embedding included)"
