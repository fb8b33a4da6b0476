"""The memory model's arithmetic on a made-up shape."""

from edgepack.runtime import memory
from edgepack.runtime.memory import ModelShape

SHAPE = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512)


def test_kv_cache_bytes():
    assert memory.kv_cache_bytes(SHAPE, 100) == 2 * 2 * 2 * 16 * 100 * 4


def test_int4_bytes_block_32():
    # 64 inputs = 2 blocks per row: 2 × (16 packed bytes + 4 scale bytes) + 1 byte of packed zero points
    assert memory.int4_bytes(10, 64) == 10 * (2 * 20 + 1)


def test_float32_weights_count_parameters_once_for_a_tied_model():
    w = memory.weight_bytes(SHAPE, "float32")
    assert w["lm_head"] == 0
    assert sum(w.values()) == SHAPE.parameters * 4


def test_factorized_layers_count_their_two_factors():
    name = SHAPE.linears()[1][0][0]  # q_proj of the last layer: 64 × 64
    dense = memory.weight_bytes(SHAPE, "float32")["linear"]
    low = memory.weight_bytes(SHAPE, "float32", {name: 8})["linear"]
    assert dense - low == (64 * 64 - 8 * (64 + 64)) * 4


def test_estimate_terms_add_up():
    e = memory.estimate_plan(SHAPE, "int4", context=64, chunk=16)
    assert e.peak == e.runtime + e.weights + e.folded + e.kv_cache + e.activations
    assert e.folded == 0 and e.kv_cache == memory.kv_cache_bytes(SHAPE, 64)
    f = memory.estimate_plan(SHAPE, "float32", context=64, chunk=16)
    assert f.folded == SHAPE.vocab * SHAPE.hidden * 4  # the constant-folded transposed LM head
    assert memory.estimate_plan(SHAPE, "int4", context=128, chunk=16).peak > e.peak
