"""Linear layers as graph nodes: float32 MatMul, int4 MatMulNBits with the exact Q4_1 remainder, or
int8 MatMulNBits (symmetric, block 32: llama.cpp's Q8_0 form).

A layer is an ``nn.Linear`` or a factorized ``nn.Sequential(Linear(in, r), Linear(r, out))`` (what
ResSVD compression leaves); the latter becomes two MatMuls (or two MatMulNBits), never re-multiplied.
Factors are quantized with integer zero points, not in the exact Q4_1 form: they are new float matrices
(there are no source Q4_1 codes to keep), and this way each factor is one MatMulNBits at any rank, with no
block-sum MatMul, Concat or remainder Add (#4: the remainder path made the ResSVD package slower than the
dense one). Factors that read the same input run their in→r halves as one MatMulNBits, then split; q/k/v
pairs are two ops, their B's stacked then their A's block-diagonal, and so is a joint group
(toolchain/ressvd/joint.py: the pairs share one in→r module), its B then its stacked A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgepack.export.fused.blocks import BLOCK, quantize_q4, quantize_q4_int, quantize_q8, remainder_digits
from edgepack.export.fused.builder import FLOAT, MS_DOMAIN, GraphBuilder
from edgepack.runtime.errors import UnsupportedArchitecture

ACCURACY_LEVEL = 4  # MatMulNBits computes in int8 on CPU: the fast path


@dataclass
class LinearEmitter:
    """Emits linear layers into ``builder``; ``int4`` or ``int8`` picks MatMulNBits of that width."""

    builder: GraphBuilder
    int4: bool
    exact: bool = True  # int4: keep Q4_1's float block minimum (remainder MatMul) or round it to an integer
    # exact int4: apply the remainder inside MatMulNBits (block sums appended to x) instead of through a
    # MatMul and an Add: measured 21 % faster decoding, same perplexity (14.996 against 15.009).
    fold: bool = True
    # Delta slots: every decoder linear gets a low-rank side branch y += (x·A)·B whose factors are graph
    # inputs (runtime/delta.py fills them from an OSD delta; rank 0 when none is loaded).
    delta_slots: bool = False
    module_names: dict[int, str] = field(default_factory=dict)  # id(module or parameter) → its torch path
    slots: list[dict[str, Any]] = field(default_factory=list)  # what the runtime needs to fill each slot
    _block_sums: dict[str, str] = field(default_factory=dict)  # input name → its per-block sums
    int8: bool = False  # 8-bit MatMulNBits (ignored with int4)
    # int4 graphs: width of the ResSVD factors' MatMulNBits, 4 (integer zero points) or 8 (symmetric, as ``int8``)
    factor_bits: int = 4
    # Separate q/k/v factor pairs as two ops (B's stacked, A's block-diagonal: ``joint``) instead of 1 + Split + 3.
    # #4, default model at 20 %, step-interleaved decode under load: 5-8 % faster a token than unpacked, for
    # 1.1 MB of zeros (93.0 -> 94.1 MB) and int4 perplexity 29.10 against 29.02 (other quantization blocks).
    block_qkv: bool = True
    # id(module) → the order of its output rows in the graph when it differs from the source's (views.py: GPT-NeoX's
    # packed q/k/v); slots record it so the runtime orders a delta's rows the same way
    rows: dict[int, np.ndarray] = field(default_factory=dict)

    def module(self, x: str, module: Any, name: str) -> str:
        """An ``nn.Linear`` or ``nn.Sequential`` of them, applied to ``x``."""
        import torch.nn as nn

        if isinstance(module, nn.Linear):
            return self.weight(x, _array(module.weight), _bias(module), name)
        if is_factorized(module):
            for i, part in enumerate(module):
                x = self.weight(x, _array(part.weight), _bias(part), f"{name}.{i}", factor=True)
            return x
        raise UnsupportedArchitecture(f"{name} is a {type(module).__name__}; the fused graph handles nn.Linear "
                                      "and nn.Sequential of nn.Linear")

    def modules(self, x: str, modules: list[Any], names: list[str], group: str) -> list[str]:
        """Each of ``modules`` applied to ``x`` (layers that cannot be packed as plain linears). The in→r
        factors of the factorized pairs among them run as one op named ``{group}.0`` and are split: one
        kernel launch instead of several small ones (measured 3-5 % less CPU a token with 12 of 30 layers
        factorized)."""
        pairs = [i for i, m in enumerate(modules) if is_factorized(m) and len(m) == 2 and m[0].bias is None]
        if len(pairs) < 2:
            return [self.module(x, m, n) for m, n in zip(modules, names)]
        ranks = [modules[i][0].out_features for i in pairs]
        low = self.weight(x, np.concatenate([_array(modules[i][0].weight) for i in pairs]), None, f"{group}.0",
                          factor=True)
        parts = dict(zip(pairs, self.builder.op("Split", [low, self.builder.const(ranks)], f"{group}/split",
                                                len(pairs), axis=-1)))
        return [self.weight(parts[i], _array(m[1].weight), _bias(m[1]), f"{n}.1", factor=True) if i in parts
                else self.module(x, m, n) for i, (m, n) in enumerate(zip(modules, names))]

    def joint(self, x: str, modules: list[Any], name: str) -> str:
        """The concatenated outputs of factor pairs reading ``x``, as two ops, as a packed dense projection
        would be: a joint group (``is_joint``) is x·Bᵀ once then the stacked A; separate pairs are their
        B's stacked, then their A's block-diagonal (zeros elsewhere: more arithmetic, fewer ops)."""
        biases = [m[1].bias for m in modules]
        bias = None if all(t is None for t in biases) else np.concatenate(
            [_array(t) if t is not None else np.zeros(m[1].out_features, np.float32) for t, m in zip(biases, modules)])
        if is_joint(modules):
            b, a = _array(modules[0][0].weight), np.concatenate([_array(m[1].weight) for m in modules])
        else:
            b, a = np.concatenate([_array(m[0].weight) for m in modules]), _block_diagonal([_array(m[1].weight)
                                                                                            for m in modules])
        return self.weight(self.weight(x, b, None, f"{name}.0", factor=True), a, bias, f"{name}.1", factor=True)

    def delta(self, x: str, y: str, n_in: int, modules: list[Any], name: str) -> str:
        """``y`` plus the delta side branch of ``modules`` (linears reading ``x`` whose outputs are
        concatenated in ``y``): one MatMul by A [n_in, Σk] (their U-side factors side by side) and one
        by B [Σk, Σn_out] (block diagonal), so a packed projection costs two small MatMuls, not six."""
        if not self.delta_slots:
            return y
        b = self.builder
        a_in = b.add_input(f"delta.{name}.a", FLOAT, [n_in, f"delta_{name}_rank"])
        b_in = b.add_input(f"delta.{name}.b", FLOAT, [f"delta_{name}_rank", sum(_out_features(m) for m in modules)])
        slot = {"a": a_in, "b": b_in, "n_in": n_in,
                "parts": [[self.module_names[id(m)], _out_features(m)] for m in modules]}
        if any(id(m) in self.rows for m in modules):
            slot["rows"] = self._rows(modules)
        self.slots.append(slot)
        low = b.op1("MatMul", [x, a_in], f"{name}/delta_a")
        y = b.op1("Add", [y, b.op1("MatMul", [low, b_in], f"{name}/delta_b")], f"{name}/add_delta")
        return self._bias_deltas(y, modules, name)

    def head_bias_delta(self, y: str, head: Any) -> str:
        """``y`` (the logits) plus a dense slot for the LM head's bias, when it has one (Phi, GPT-J: a full
        fine-tune moves it; the head's weight is not a delta layer)."""
        return self._bias_deltas(y, [head], "lm_head") if self.delta_slots else y

    def _bias_deltas(self, y: str, modules: list[Any], name: str) -> str:
        """``y`` plus dense slots for the modules' biases (a fine-tune moves Qwen2's q/k/v biases too): the
        biases themselves are baked into the projection's op, so their changes are added after it."""
        if all(_last(m).bias is None for m in modules):
            return y
        b, parts = self.builder, []
        for m in modules:
            width = _out_features(m)
            if _last(m).bias is None:
                parts.append(b.const(np.zeros(width, np.float32), np.float32))
                continue
            path = f"{self.module_names[id(m)]}.bias"  # the source model's name, factorized or not
            parts.append(b.add_input(f"delta.{path}", FLOAT, [width]))
            self.slots.append({"dense": path, "input": parts[-1], "shape": [width]} |
                              ({"rows": self._rows([m])} if id(m) in self.rows else {}))
        change = parts[0] if len(parts) == 1 else b.op1("Concat", parts, f"{name}/bias_delta", axis=0)
        return b.op1("Add", [y, change], f"{name}/add_bias_delta")

    def _rows(self, modules: list[Any]) -> list[int]:
        """Source row of each graph output row of ``modules`` side by side (JSON-ready)."""
        order, offset = [], 0
        for m in modules:
            width = _out_features(m)
            order.extend(int(r) + offset for r in self.rows.get(id(m), range(width)))
            offset += width
        return order

    def linear(self, x: str, module: Any, name: str) -> str:
        """``module`` (a linear layer or a factorized pair) applied to ``x``, with its delta side branch."""
        return self.delta(x, self.module(x, module, name), in_features(module), [module], name)

    def parameter(self, name: str, param: Any) -> str:
        """A parameter read as it is (a norm's weight, a convolution, Mamba's A_log or D, an attention sink), as the
        weight ``name`` with its dense delta slot."""
        return self.dense_delta(self.builder.weight(name, _array(param)), param)

    def dense_delta(self, value: str, param: Any) -> str:
        """``value`` (the initializer of ``param``, e.g. a norm's weight) plus a delta input of the same
        shape (zeros when no delta is loaded), so deltas that change norms apply too."""
        if not self.delta_slots:
            return value
        path = self.module_names[id(param)]
        delta = self.builder.add_input(f"delta.{path}", FLOAT, list(param.shape))
        self.slots.append({"dense": path, "input": delta, "shape": list(param.shape)})
        return self.builder.op1("Add", [value, delta], f"{path}/add_delta")

    def weight(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str, factor: bool = False) -> str:
        """``x @ weight.T + bias`` for a [n_out, n_in] weight; a ``factor`` of a factorized pair takes int4
        with integer zero points (one op: see the module docstring), or 8 bits with ``factor_bits=8``."""
        # MatMulNBits adds a bias inside its kernel (its optional last input): one op less per biased layer
        if self.int4 and factor and self.factor_bits == 8:
            return self._int8(x, weight, name, bias)
        if self.int4:
            return self._int4(x, weight, name, self.exact and not factor, bias)
        if self.int8:
            return self._int8(x, weight, name, bias)
        y = self.float_weight(x, weight, name)
        if bias is not None:
            y = self.builder.op1("Add", [y, self.builder.weight(f"{name}.bias", bias)], f"{name}/bias")
        return y

    def _nbits_inputs(self, x: str, tensors: list[str], bias: np.ndarray | None, name: str) -> list[str]:
        """MatMulNBits' inputs: A, B, scales[, zero_points], then g_idx left out and the bias, when there is one."""
        if bias is None:
            return [x, *tensors]
        return [x, *tensors, *[""] * (3 - len(tensors)), "", self.builder.weight(f"{name}.bias", bias)]

    def float_weight(self, x: str, weight: np.ndarray, name: str) -> str:
        """``x @ weight.T`` in float32, whatever the graph's width (also a mixture of experts' router: moe.py)."""
        w = self.builder.weight(f"{name}.weight", np.ascontiguousarray(weight.T))
        return self.builder.op1("MatMul", [x, w], f"{name}/MatMul")

    def _int8(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """Symmetric 8-bit blocks of 32 (codes + 128 against the default zero point 128, as ``head_8bit``)."""
        q = quantize_q8(weight)
        b = self.builder
        tensors = [b.weight(f"{name}.qweight", q.data), b.weight(f"{name}.scales", q.scales)]
        return b.op1("MatMulNBits", self._nbits_inputs(x, tensors, bias, name), f"{name}/MatMulNBits",
                     domain=MS_DOMAIN, K=q.n_in, N=q.n_out, bits=8, block_size=BLOCK,
                     accuracy_level=ACCURACY_LEVEL)

    def _int4(self, x: str, weight: np.ndarray, name: str, exact: bool, bias: np.ndarray | None = None) -> str:
        b = self.builder
        if not exact:
            qi = quantize_q4_int(weight)
            tensors = [b.weight(f"{name}.qweight", qi.packed), b.weight(f"{name}.scales", qi.scales),
                       b.weight(f"{name}.zero_points", qi.zero_points)]
            return b.op1("MatMulNBits", self._nbits_inputs(x, tensors, bias, name), f"{name}/MatMulNBits",
                         domain=MS_DOMAIN, K=qi.n_in, N=qi.n_out, bits=4, block_size=BLOCK,
                         accuracy_level=ACCURACY_LEVEL)
        q = quantize_q4(weight)
        if self.fold and q.n_in % BLOCK == 0:
            return self._int4_folded(x, q, name, bias)
        tensors = [b.weight(f"{name}.qweight", q.packed), b.weight(f"{name}.scales", q.scales)]
        y = b.op1("MatMulNBits", self._nbits_inputs(x, tensors, bias, name), f"{name}/MatMulNBits",
                  domain=MS_DOMAIN, K=q.n_in, N=q.n_out, bits=4, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)
        # The per-block minimum MatMulNBits cannot hold as an integer zero point: sum_b blocksum_b(x) * r_b.
        sums = self._block_sum(x, q.n_in)
        fix = b.op1("MatMul", [sums, b.weight(f"{name}.remainder", np.ascontiguousarray(q.remainder.T))],
                    f"{name}/remainder")
        return b.op1("Add", [y, fix], f"{name}/add_remainder")

    def _int4_folded(self, x: str, q: Any, name: str, bias: np.ndarray | None = None) -> str:
        """One MatMulNBits over [x, blocksum(x), blocksum(x)]: the remainders ride as two 4-bit digit
        blocks (their error is at most 1/196 of the largest remainder of their block of 32)."""
        b = self.builder
        digits, digit_scales, _ = remainder_digits(q.remainder)
        packed = np.concatenate([q.packed, digits], axis=1)
        scales = np.concatenate([q.scales.reshape(q.n_out, -1), digit_scales.reshape(q.n_out, -1)], axis=1)
        key = f"{x}#augmented"
        if key not in self._block_sums:
            sums = self._block_sum(x, q.n_in, pad=True)
            self._block_sums[key] = b.op1("Concat", [x, sums, sums], f"{x}/augmented", axis=-1)
        tensors = [b.weight(f"{name}.qweight", packed), b.weight(f"{name}.scales", scales.reshape(-1))]
        return b.op1("MatMulNBits", self._nbits_inputs(self._block_sums[key], tensors, bias, name),
                     f"{name}/MatMulNBits", domain=MS_DOMAIN, K=packed.shape[1] * BLOCK, N=q.n_out, bits=4,
                     block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)

    def _block_sum(self, x: str, n_in: int, pad: bool = False) -> str:
        """Sums of ``x`` over each block of 32 features, as x @ (0/1 block indicator); shared per input."""
        key = f"{x}#padded" if pad else x
        if key not in self._block_sums:
            blocks = -(-n_in // BLOCK)
            width = -(-blocks // BLOCK) * BLOCK if pad else blocks  # padded: whole blocks of sums
            indicator = np.zeros((n_in, width), np.float32)
            indicator[np.arange(n_in), np.arange(n_in) // BLOCK] = 1.0
            self._block_sums[key] = self.builder.op1(
                "MatMul", [x, self.builder.const(indicator, np.float32)], f"{x}/block_sums")
        return self._block_sums[key]


@dataclass(frozen=True)
class Table8:
    """An embedding table stored once as 8-bit blocks, for both lookups and the tied LM head."""

    data: str  # initializer name, uint8 [vocab, blocks, 32]
    scales: str  # initializer name, float32 [vocab * blocks]
    vocab: int
    hidden: int


def table_8bit(b: GraphBuilder, embedding: np.ndarray) -> Table8:
    """Store a [vocab, hidden] table as symmetric 8-bit blocks (the default model's embedding is Q8_0,
    so this is exact for it)."""
    q8 = quantize_q8(embedding)
    return Table8(b.weight("embed.q8", q8.data), b.weight("embed.scales", q8.scales), q8.n_out, q8.n_in)


def embed_8bit(b: GraphBuilder, ids: str, table: Table8) -> str:
    """Look up rows: Gather bytes and block scales, then (q - 128) * scale, flattened to [1, S, hidden]."""
    rows = b.op1("Gather", [table.data, ids], "embed/gather_q")
    scales = b.op1("Reshape", [table.scales, b.const([table.vocab, -1, 1])], "embed/scales_3d")
    row_scales = b.op1("Gather", [scales, ids], "embed/gather_scales")
    values = b.op1("Sub", [b.op1("Cast", [rows], "embed/cast", to=1), b.const([128.0], np.float32)], "embed/center")
    flat = b.op1("Reshape", [b.op1("Mul", [values, row_scales], "embed/scale"), b.const([0, 0, -1])], "embed/flat")
    if (-(-table.hidden // BLOCK)) * BLOCK != table.hidden:
        flat = b.op1("Slice", [flat, b.const([0]), b.const([table.hidden]), b.const([2])], "embed/unpad")
    return flat


def head_8bit(b: GraphBuilder, x: str, table: Table8) -> str:
    """Logits through 8-bit MatMulNBits over the very initializers ``embed_8bit`` reads."""
    return b.op1("MatMulNBits", [x, table.data, table.scales], "lm_head/MatMulNBits", domain=MS_DOMAIN,
                 K=table.hidden, N=table.vocab, bits=8, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)


def is_factorized(module: Any) -> bool:
    """An ``nn.Sequential`` of ``nn.Linear`` (ResSVD's in→r, r→out pair)."""
    import torch.nn as nn

    return isinstance(module, nn.Sequential) and len(module) > 0 and all(isinstance(m, nn.Linear) for m in module)


def is_joint(modules: list[Any]) -> bool:
    """Factor pairs with one common in→r module (ResSVD's joint factorization)."""
    first = modules[0][0] if is_factorized(modules[0]) and len(modules[0]) == 2 else None
    return first is not None and len(modules) >= 2 and all(
        is_factorized(m) and len(m) == 2 and m[0] is first and m[0].bias is None for m in modules)


def is_pairs(modules: list[Any]) -> bool:
    """Factor pairs without a bias on their in→r half (what ``LinearEmitter.joint`` packs)."""
    return all(is_factorized(m) and len(m) == 2 and m[0].bias is None for m in modules)


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), np.float32)
    row = col = 0
    for b in blocks:
        out[row:row + b.shape[0], col:col + b.shape[1]] = b
        row, col = row + b.shape[0], col + b.shape[1]
    return out


def _array(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _bias(m: Any) -> np.ndarray | None:
    return None if m.bias is None else _array(m.bias)


def _last(module: Any) -> Any:
    """The ``nn.Linear`` that writes the output (the second of a factorized pair), which holds the bias."""
    return module[-1] if hasattr(module, "__getitem__") else module


def _out_features(module: Any) -> int:
    """Output width of an ``nn.Linear`` or of the last layer of a factorized pair."""
    return int(module[-1].out_features if hasattr(module, "__getitem__") else module.out_features)


def in_features(module: Any) -> int:
    """Input width of an ``nn.Linear`` or of the first layer of a factorized pair."""
    return int(module[0].in_features if hasattr(module, "__getitem__") else module.in_features)
