"""The planner on a tiny shape with made-up budgets."""

import dataclasses
import json

import pytest
from edgepack.runtime import memory
from edgepack.runtime.profiles import DeviceProfile
from edgepack.toolchain.planner import Plan, PlanError, make_plan
from edgepack.toolchain.planner.plan import GRAPHS, candidates, graph_for

SHAPE = memory.ModelShape(layers=4, hidden=256, intermediate=768, heads=4, kv_heads=2, head_dim=64, vocab=4096)
MB = 1 << 20


def device(budget_mb: float, storage_mb: float = 10_000) -> DeviceProfile:
    return DeviceProfile(name="made-up", description="test", kind="sbc", ram_mb=100_000, app_memory_mb=budget_mb,
                         storage_mb=storage_mb, cores=1, cpu="x", arch="x")


def test_roomy_device_gets_float32_uncompressed():
    plan = make_plan(SHAPE, device(10_000), context=256)
    assert (plan.dtype, plan.ratio, plan.ranks) == ("float32", 0.0, {})
    assert plan.peak_bytes <= plan.budget_bytes


@pytest.mark.parametrize("graph", GRAPHS)
def test_smaller_budget_never_gives_a_larger_package(graph):
    peaks = sorted({c.estimate.peak for c in candidates(SHAPE, 256, graph)})
    budgets = sorted({p / MB + d for p in peaks for d in (-0.01, 0.0, 0.01)}, reverse=True)
    sizes, costs = [], []
    for b in budgets:
        try:
            plan = make_plan(SHAPE, device(b), context=256, graph=graph)
        except PlanError:
            continue
        assert plan.peak_bytes <= b * MB
        sizes.append(plan.package_bytes)
        costs.append(plan.expected_ppl_ratio)
    assert len(set(sizes)) > 2, "the budgets should walk through several plans"
    assert sizes == sorted(sizes, reverse=True) and costs == sorted(costs)


def test_compressed_plan_has_last_k_ranks():
    frontier = candidates(SHAPE, 256)
    # a budget that only compressed plans fit (a cheaper compressed candidate may exist, but the planner
    # tries every uncompressed plan first)
    smallest_dense = min(c.estimate.peak for c in frontier if c.ratio == 0)
    compressed = next(c for c in frontier if c.ratio > 0 and c.estimate.peak < smallest_dense)
    plan = make_plan(SHAPE, device(compressed.estimate.peak / MB), context=256)
    assert plan.k >= 1 and plan.ranks
    layers = {int(n.split(".")[2]) for n in plan.ranks}
    assert layers == set(range(SHAPE.layers - plan.k, SHAPE.layers))


def test_storage_limit_is_respected():
    limit = candidates(SHAPE, 256)[0].size / MB / 2  # half of the float32 package
    plan = make_plan(SHAPE, device(10_000, storage_mb=limit), context=256)
    assert plan.package_bytes <= limit * MB and plan.dtype == "int4"


def test_phone_storage_counts_the_ort_copy():
    f32 = make_plan(SHAPE, device(10_000), context=256)
    assert f32.dtype == "float32"
    phone = dataclasses.replace(device(10_000, storage_mb=1.5 * f32.package_bytes / MB), kind="phone")
    assert phone.mobile
    plan = make_plan(SHAPE, phone, context=256)  # the float32 weights fit once, not twice
    assert plan.dtype == "int4" and 2 * plan.package_bytes <= phone.storage_bytes


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


def test_shorter_context_comes_before_compression():
    # weights dominate this shape's memory, so compressing buys more room than shortening the context
    wide = memory.ModelShape(layers=8, hidden=1024, intermediate=4096, heads=8, kv_heads=1, head_dim=128, vocab=4096)
    uncompressed_256 = next(c for c in candidates(wide, 256, "fused") if c.ratio == 0 and c.dtype == "int4")
    budget = uncompressed_256.estimate.peak / MB + 0.01
    compressed_1024 = [c for c in candidates(wide, 1024, "fused") if c.ratio > 0 and c.estimate.peak <= budget * MB]
    assert compressed_1024, "the budget should also admit a compressed plan at a longer context"
    plan = make_plan(wide, device(budget), max_context=1024, graph="fused")
    assert (plan.ratio, plan.context) == (0.0, 256)
    assert make_plan(wide, device(budget), context=1024, graph="fused").ratio > 0  # a given context is kept


def test_plan_round_trips_through_json():
    plan = make_plan(SHAPE, device(10_000), context=256)
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_graph_follows_the_architecture():
    llama = {"model_type": "llama", "hidden_act": "silu"}
    assert graph_for(llama) == "fused"
    assert graph_for({"model_type": "opt", "do_layer_norm_before": False}) == "optimum"  # OPT-350m
    assert graph_for({"model_type": "bloom", "n_head": 16, "hidden_size": 1024}) == "fused"  # ALiBi, bloom-560m
    assert graph_for({"model_type": "bloom", "apply_residual_connection_post_layernorm": True}) == "optimum"
    mpt = {"model_type": "mpt", "attn_config": {"alibi": True, "clip_qkv": None}}  # a config.json's nested dict
    assert graph_for(mpt) == "fused"
    assert graph_for({**mpt, "attn_config": {"clip_qkv": 6.0}}) == "optimum"
    falcon = {"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71}  # falcon-7b's sparse config.json
    assert graph_for(falcon) == "fused"
    assert graph_for({**falcon, "alibi": True}) == "fused"  # Falcon-RW: ALiBi as the attention bias
    assert graph_for({"model_type": "gpt2", "activation_function": "gelu_new"}) == "fused"  # through views.py
    assert graph_for({"model_type": "gpt2", "activation_function": "gelu_new", "add_cross_attention": True}) == \
        "optimum"
    assert graph_for({**llama, "sliding_window": 4096}) == "fused"  # GroupQueryAttention's local window
    assert graph_for({**llama, "hidden_act": "mish"}) == "optimum"  # an activation the graph lacks
    codegen = {"model_type": "codegen", "n_embd": 1024, "n_head": 16, "rotary_dim": 32}  # codegen-350M's spelling
    assert graph_for(codegen) == "fused"
    assert graph_for({**codegen, "n_head": 6, "n_embd": 384}) == "optimum"  # not 4 model-parallel blocks


def test_fused_int4_is_smaller_and_cheaper_than_the_optimum_layout():
    fused = make_plan(SHAPE, device(10_000), context=256, graph="fused")
    assert fused.graph == "fused" and "fused graph" in fused.quality_basis
    f = {(c.dtype, c.ratio): c for c in candidates(SHAPE, 256, "fused")}
    o = {(c.dtype, c.ratio): c for c in candidates(SHAPE, 256, "optimum")}
    assert f["int4", 0.0].estimate.peak < o["int4", 0.0].estimate.peak
    assert f["int4", 0.0].cost < o["int4", 0.0].cost


def test_plans_made_before_the_graph_field_load_as_optimum():
    data = make_plan(SHAPE, device(10_000), context=256, graph="optimum").to_dict()
    del data["graph"]
    assert Plan.from_dict(data).graph == "optimum"
    with pytest.raises(Exception, match="unknown graph"):
        Plan.from_dict({**data, "graph": "tflite"})
