"""The memory model: predicted peak resident memory of running a package in this runtime.

    peak = runtime + weights × load_factor(layout) + folded copies + KV cache(context) + activations(chunk, context)

- runtime: the interpreter with numpy, onnxruntime and the tokenizer loaded (measured).
- weights: the bytes of the package's initializers at their dtype (factorized layers at their ranks),
  read from the model files of a package, or computed from the model config when planning.
  ``load_factor`` is what onnxruntime holds per stored byte once the session is built (a float32
  session re-lays MatMul weights out and frees the originals; an int4 session keeps the mapped
  weights and adds the MatMulNBits pre-packed copy) — measured on this runtime, see README.
- folded copies: a float32 export feeds its tied LM head from ``Transpose(embedding)``, which
  onnxruntime constant-folds at load into a second vocab × hidden float32 matrix.
- KV cache: 2 × layers × kv_heads × head_dim × context × 4 bytes.
- activations: one forward over a prefill chunk of ``chunk`` tokens attending ``context`` positions
  (logits, attention scores, MLP), times onnxruntime's arena growth factor.
Torch-free, so ``edgepack bench --device`` can check a package on a target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

F32 = 4
INT4_BLOCK = 32
# Measured (#7, default model, fused graph): the load's peak above the imports is 1.42 x the stored bytes for
# int8 against 1.61 x for int4, so int8 gets int4's factor scaled by 1.42 / 1.61.
INT8_LOAD_FACTOR = 1.45

# Calibrated on this runtime (onnxruntime 1.32, CPU, graph optimization "all"); see README, memory model.
RUNTIME_BYTES = 75e6
# layout → resident bytes per stored byte. "int4": the device layout (all weights int4, external data);
# "int4-matmul": the plain ``--int4`` build (float32 embedding in the protobuf, decoder MatMuls int4).
# "int8": the fused ``--int8`` build (external data); "int8-matmul": ``--int8`` on optimum's graph, not
# measured: int4-matmul's factor is assumed for it.
# "fused-float32" / "fused-int4": edgepack's fused Llama graph (#7), weights as external data, a tied embedding
# stored once and read by the head too (float32, or one 8-bit table in an int4 package); fitted on the default
# model's packages with ``edgepack bench --fill`` (README, memory model).
LOAD_FACTOR = {"float32": 1.32, "int4": 1.65, "int4-matmul": 2.2, "int8": INT8_LOAD_FACTOR, "int8-matmul": 2.2,
               "fused-float32": 1.1, "fused-int4": 1.6}
FOLDED_LAYOUTS = ("float32", "int4-matmul", "int8-matmul")
# The fused graph keeps logits for the last position only and GroupQueryAttention one score buffer per head.
FUSED_LAYOUTS = ("fused-float32", "fused-int4", "int8")
ARENA_FACTOR = 2.0
ATTENTION_BUFFERS = 4  # scores, mask add, softmax, and the where/cast the export keeps, per head
# Width of ResSVD factor pairs in a fused int4 package (``edgepack build --factor-bits``, export/fused/linear.py).
FACTOR_BITS = (4, 8)
DEFAULT_FACTOR_BITS = 4


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a decoder-only transformer: a Llama-style block, or, where
    ``layer_linears`` is given, the block's own linear layers."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True
    # (name with "{i}" for the layer index, out, in) of each linear layer ResSVD may compress, read from the
    # model's modules by the toolchain (toolchain/planner/shape.py); empty: the Llama block below.
    layer_linears: tuple[tuple[str, int, int], ...] = ()
    # (out, in, count in the whole model) of the linear layers ResSVD never compresses: a mixture of experts'
    # routed experts and routers, stored at the package's weight width (the fused graph keeps its routers in
    # float32, a few MB the estimate leaves out).
    fixed_linears: tuple[tuple[int, int, int], ...] = ()
    # Layers that differ in their linear layers (LFM2: convolution and attention layers): per layer, (full name,
    # out, in) of each; when given it replaces ``layer_linears``.
    per_layer_linears: tuple[tuple[tuple[str, int, int], ...], ...] = ()
    kv_layers: int | None = None  # layers with a KV cache (LFM2: its attention layers only); None: all
    # Mamba: the bytes of its layers' convolution and SSM states (held instead of a KV cache, whatever the context),
    # and the bytes each prefilled position adds to a Mamba layer's scan inputs ([positions, channels, N] tensors)
    state_bytes: int = 0
    scan_bytes: int = 0

    def __post_init__(self) -> None:  # from JSON the entries arrive as lists
        object.__setattr__(self, "layer_linears", tuple(tuple(e) for e in self.layer_linears))
        object.__setattr__(self, "fixed_linears", tuple(tuple(e) for e in self.fixed_linears))
        object.__setattr__(self, "per_layer_linears", tuple(tuple(tuple(e) for e in layer)
                                                            for layer in self.per_layer_linears))

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        heads = int(cfg["num_attention_heads"])
        return cls(
            layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
            intermediate=int(cfg["intermediate_size"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def linears(self) -> list[list[tuple[str, int, int]]]:
        """Per layer, (name, out, in) of the decoder's linear layers, in ResSVD's naming."""
        if self.per_layer_linears:
            return [list(layer) for layer in self.per_layer_linears]
        if self.layer_linears:
            return [[(name.format(i=n), o, k) for name, o, k in self.layer_linears] for n in range(self.layers)]
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        shapes = [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                  ("self_attn.o_proj", h, q), ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h),
                  ("mlp.down_proj", h, i)]
        return [[(f"model.layers.{n}.{name}", o, k) for name, o, k in shapes] for n in range(self.layers)]

    @property
    def parameters(self) -> int:
        linear = sum(o * k for layer in self.linears() for _, o, k in layer) + sum(
            o * k * n for o, k, n in self.fixed_linears)
        norms = self.hidden * (2 * self.layers + 1)
        return linear + norms + self.vocab * self.hidden * (1 if self.tied else 2)


def int4_bytes(out: int, inner: int, block: int = INT4_BLOCK) -> int:
    """MatMulNBits / GatherBlockQuantized storage: packed nibbles, float32 scales, packed zero points."""
    blocks = -(-inner // block)
    return out * blocks * (block // 2 + F32) + out * (-(-blocks // 2))


def int8_bytes(out: int, inner: int, block: int = INT4_BLOCK) -> int:
    """8-bit MatMulNBits storage (symmetric: bytes and float32 scales, no zero points)."""
    return out * -(-inner // block) * (block + F32)


def fused_int4_bytes(out: int, inner: int, block: int = INT4_BLOCK) -> int:
    """The fused graph's exact Q4_1 MatMulNBits (export/fused/linear.py): 4-bit values and float32 scales,
    the per-block minimums as two extra 4-bit digit blocks per 32 blocks when ``inner`` is whole blocks,
    else a float32 remainder matrix (blocks × out)."""
    blocks = -(-inner // block)
    if inner % block == 0:
        return out * (blocks + 2 * -(-blocks // block)) * (block // 2 + F32)
    return out * blocks * (block // 2 + F32) + out * blocks * F32


def _linear_bytes(shape: ModelShape, ranks: dict[str, int] | None, size: Any, factor_size: Any = None,
                  block_qkv: bool = False) -> int:
    """Bytes of the decoder linears; ``factor_size`` (default ``size``) counts each factor of a factorized one.
    ``block_qkv``: factorized q/k/v store their r→out factors as one block-diagonal matrix (the fused graph)."""
    ranks, factor_size = ranks or {}, factor_size or size
    total = 0
    for layer in shape.linears():
        qkv = layer[:3]
        packed = block_qkv and all(name in ranks and name.endswith(f"{p}_proj") for (name, _, _), p in zip(qkv, "qkv"))
        for name, out, inner in layer[3:] if packed else layer:
            r = ranks.get(name)
            total += size(out, inner) if r is None else factor_size(r, inner) + factor_size(out, r)
        if packed:
            r = sum(ranks[name] for name, _, _ in qkv)
            total += factor_size(r, qkv[0][2]) + factor_size(sum(out for _, out, _ in qkv), r)
    return total


def matrix_bytes(out: int, inner: int, dtype: str) -> int:
    if dtype == "float32":
        return out * inner * F32
    return int8_bytes(out, inner) if dtype == "int8" else int4_bytes(out, inner)


def weight_bytes(shape: ModelShape, dtype: str, ranks: dict[str, int] | None = None,
                 graph: str = "optimum", factor_bits: int = DEFAULT_FACTOR_BITS) -> dict[str, int]:
    """Bytes of each kind of weight a package of ``dtype`` holds (float32: the plain export; int4:
    the device layout, where embedding and LM head are int4 too, or with ``graph="fused"`` one 8-bit
    table for a tied embedding and LM head; int8: the fused graph, one 8-bit table likewise).
    Factorized layers count as their two factors (in→r, r→out), in a fused int4 graph at ``factor_bits``."""
    norms = shape.hidden * (2 * shape.layers + 1) * F32
    vocab = shape.vocab * shape.hidden
    if graph == "fused" and dtype == "int4":
        # a tied table is one 8-bit copy for Gather and head; untied: float32 Gather, int4 head
        embedding = matrix_bytes(shape.vocab, shape.hidden, "int8") if shape.tied else vocab * F32
        lm_head = 0 if shape.tied else fused_int4_bytes(shape.vocab, shape.hidden)
        # ResSVD factors take integer zero points there (export/fused/linear.py), not the Q4_1 form, or 8 bits
        factor_size = int8_bytes if factor_bits == 8 else int4_bytes
        return {"linear": _linear_bytes(shape, ranks, fused_int4_bytes, factor_size, block_qkv=True),
                "embedding": embedding, "lm_head": lm_head, "norms": norms,
                "experts": _fixed_bytes(shape, int4_bytes)}  # QMoE: integer zero points (export/fused/moe.py)
    linear = _linear_bytes(shape, ranks, lambda out, inner: matrix_bytes(out, inner, dtype), block_qkv=graph == "fused")
    embedding = vocab * F32 if dtype == "float32" else matrix_bytes(shape.vocab, shape.hidden, dtype)
    shared = dtype in ("float32", "int8") and shape.tied  # the head reads the embedding's table
    lm_head = 0 if shared else matrix_bytes(shape.vocab, shape.hidden, dtype)
    return {"linear": linear, "embedding": embedding, "lm_head": lm_head, "norms": norms,
            "experts": _fixed_bytes(shape, lambda out, inner: matrix_bytes(out, inner, dtype))}


def _fixed_bytes(shape: ModelShape, size: Any) -> int:
    """Bytes of the linear layers compression never touches (``ModelShape.fixed_linears``) at ``size``."""
    return sum(size(out, inner) * count for out, inner, count in shape.fixed_linears)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident bytes of running a package, by term."""

    runtime: int
    weights: int  # as held in memory: stored bytes × load factor
    folded: int  # constant-folded copies made at load
    kv_cache: int
    activations: int
    stored_weights: int  # bytes on disk (the package's model files)
    context: int
    chunk: int

    @property
    def peak(self) -> int:
        return self.runtime + self.weights + self.folded + self.kv_cache + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak": self.peak}


def kv_cache_bytes(shape: ModelShape, context: int) -> int:
    """The KV cache of ``context`` positions, plus a state-space model's fixed states."""
    layers = shape.layers if shape.kv_layers is None else shape.kv_layers
    return 2 * layers * shape.kv_heads * shape.head_dim * context * F32 + shape.state_bytes


def activation_bytes(shape: ModelShape, context: int, chunk: int, fused: bool = False) -> int:
    """One forward over ``chunk`` new tokens after ``context − chunk`` cached ones, arena-rounded."""
    chunk = min(chunk, context)
    logits = (1 if fused else chunk) * shape.vocab * F32
    attention = (1 if fused else ATTENTION_BUFFERS) * shape.heads * chunk * context * F32
    mlp = 3 * chunk * shape.intermediate * F32
    hidden = 8 * chunk * shape.hidden * F32
    # a Mamba layer's scan inputs, one layer at a time; measured without the arena's growth, as attention's scores
    scan = chunk * shape.scan_bytes
    if fused:  # measured: GroupQueryAttention's scores do not grow the arena like the rest (README)
        return int(ARENA_FACTOR * (logits + mlp + hidden) + attention + scan)
    return int(ARENA_FACTOR * (logits + attention + mlp + hidden) + scan)


def estimate(shape: ModelShape, dtype: str, stored_weights: int, context: int, chunk: int = 256,
             folded: int | None = None) -> MemoryEstimate:
    """Peak for a package whose model files hold ``stored_weights`` bytes."""
    if dtype not in LOAD_FACTOR:
        raise ValueError(f"no memory model for dtype {dtype!r}")
    if folded is None:
        folded = shape.vocab * shape.hidden * F32 if dtype in FOLDED_LAYOUTS and shape.tied else 0
    return MemoryEstimate(
        runtime=int(RUNTIME_BYTES), weights=int(stored_weights * LOAD_FACTOR[dtype]), folded=folded,
        kv_cache=kv_cache_bytes(shape, context),
        activations=activation_bytes(shape, context, chunk, fused=dtype in FUSED_LAYOUTS),
        stored_weights=stored_weights, context=context, chunk=chunk,
    )


def estimate_plan(shape: ModelShape, dtype: str, context: int, ranks: dict[str, int] | None = None,
                  chunk: int = 256, graph: str = "optimum", factor_bits: int = DEFAULT_FACTOR_BITS) -> MemoryEstimate:
    """Peak for a package not built yet, from the model's shape alone (``graph``: "optimum" builds the
    device layout of ``dtype``, "fused" edgepack's fused graph; ``factor_bits``: its ResSVD factors' width)."""
    stored = sum(weight_bytes(shape, dtype, ranks, graph, factor_bits).values())
    return estimate(shape, plan_layout(dtype, graph), stored, context, chunk)


def plan_layout(dtype: str, graph: str) -> str:
    """The memory model's layout of a device build of ``dtype`` on ``graph``."""
    if graph != "fused":
        return dtype
    return "int8" if dtype == "int8" else f"fused-{dtype}"


def package_layout(manifest: Any, files: dict[str, int]) -> str:
    """The memory model's layout of a built package (see ``LOAD_FACTOR``)."""
    layout = manifest.plan.get("layout")
    if layout in LOAD_FACTOR:
        return layout
    if manifest.plan.get("graph") == "fused" and manifest.dtype in ("float32", "int4", "int8"):
        return plan_layout(manifest.dtype, "fused")
    if manifest.dtype in ("int4", "int8"):
        return manifest.dtype if "model.onnx.data" in files else f"{manifest.dtype}-matmul"
    return "float32"


def estimate_package(path: Any, context: int | None = None, chunk: int = 256,
                     shape: ModelShape | None = None) -> MemoryEstimate:
    """Peak for a built package, from its manifest and the sizes of its model files."""
    from edgepack.runtime.errors import PackageError
    from edgepack.runtime.package import read_manifest

    manifest = read_manifest(path)
    if shape is None:
        if not manifest.model.get("shape"):
            raise PackageError(f"{path}: the manifest records no model shape (built before edgepack 0.1's "
                               "memory model); rebuild it to check it against a device")
        shape = ModelShape(**manifest.model["shape"])
    files = {name: entry.size for name, entry in manifest.files.items()}
    stored = sum(size for name, size in files.items() if name.startswith("model.onnx"))
    context = context or int(manifest.plan.get("context_length") or 2048)
    return estimate(shape, package_layout(manifest, files), stored, context, chunk)
