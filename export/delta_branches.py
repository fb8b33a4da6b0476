"""Delta slots in optimum's graph: the same low-rank side branches the fused graph has (export/fused/linear.py),
added to an exported ONNX file afterwards, so fine-tune deltas apply to every architecture optimum exports.

Each decoder linear layer (a ``nn.Linear`` other than the output head, or a ResSVD pair ``Sequential(Linear,
Linear)``) gets y += (x·A)·B with A and B graph inputs, plus a dense input for its bias when it has one; each
other 1-D parameter (norm weights and biases) the graph reads from an initializer gets a zero-default input added
to it. The metadata is the fused graph's (``edgepack.delta_slots``), so ``runtime/delta.py`` fills both alike.

Layers are found by value, not by name: torch's exporter stores a linear layer's weight transposed under a
generated name (``onnx::MatMul_570``), so the MatMul whose constant operand equals Wᵀ is that layer; node scopes
(``/model/layers.0/self_attn/q_proj/MatMul``) only break ties between layers with equal weights. No library does
this rewrite (onnxruntime's tools and optimum's exporter have no notion of side branches), hence by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgepack.runtime.delta import DELTA_SLOTS_KEY
from edgepack.runtime.errors import UnsupportedArchitecture

FLOAT = 1  # onnx.TensorProto.FLOAT


def targets(model: Any) -> dict[str, tuple[Any, Any]]:
    """Each layer a delta can change, by its torch path: (the module reading x, the module writing y)."""
    import torch.nn as nn
    from edgepack.export.fused.linear import is_factorized

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, tuple[Any, Any]] = {}
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(f"{p}.") for p in inside):
            continue
        if is_factorized(module):
            out[name] = (module[0], module[-1])
            inside.add(name)
        elif isinstance(module, nn.Linear) and module is not head:
            out[name] = (module, module)
    return out


def scopes(path: str) -> list[str]:
    """torch's exporter scope of a module path, longest first: ``model.layers.0.mlp`` → ``/model/layers.0/mlp/``,
    then without leading parts (OPT's graph names its decoder ``/decoder/...``, not ``/model/decoder/...``)."""
    parts = re.sub(r"\.(?!\d+(?:\.|$))", "/", path).split("/")
    return ["/" + "/".join(parts[i:]) + "/" for i in range(len(parts))]


@dataclass
class _Graph:
    """The exported graph, indexed: MatMul / Gemm nodes by a digest of their constant operand, and the 1-D
    initializers (where norm weights and biases live) by name. Digests, not values, so the index does not
    hold a second copy of the weights."""

    model: Any
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    by_weight: dict[bytes, list[Any]] = field(default_factory=dict)
    before: list[Any] = field(default_factory=list)  # new nodes that read only initializers and inputs
    after: dict[str, list[Any]] = field(default_factory=dict)  # a node's first output → new nodes to place after it
    slots: list[dict[str, Any]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # Identity outputs → the initializer they copy
    renames: list[tuple[str, str, Any]] = field(default_factory=list)  # (layer output, with delta, its Add)

    @classmethod
    def index(cls, model: Any) -> _Graph:
        from onnx import numpy_helper

        tensors = {t.name: t for t in model.graph.initializer}
        g = cls(model, {n: numpy_helper.to_array(t) for n, t in tensors.items() if len(t.dims) == 1})
        digests: dict[str, bytes] = {}
        for node in model.graph.node:
            if node.op_type == "Identity" and node.input[0] in tensors:
                g.aliases[node.output[0]] = node.input[0]
            weight = tensors.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
            if weight is None or len(weight.dims) != 2:
                continue
            if node.input[1] not in digests:
                digests[node.input[1]] = _key(numpy_helper.to_array(weight))
            key = _operand_key(node, digests[node.input[1]], weight)
            if key is not None:
                g.by_weight.setdefault(key, []).append(node)
        return g

    def matmul(self, linear: Any, path: str, reader: bool) -> Any | None:
        """The MatMul (or Gemm) node of ``linear`` (its constant operand is Wᵀ), by scope when several share it.
        A ``reader`` may be any of several that read the same x (a joint group's shared in→r factor)."""
        weight = linear.weight.detach().float().numpy()
        nodes = [*self.by_weight.get(_key(weight.T), []), *self.by_weight.get(b"T" + _key(weight), [])]
        if len(nodes) > 1:
            nodes = next(([n for n in nodes if n.name.startswith(p)] for p in scopes(path)
                          if any(n.name.startswith(p) for n in nodes)), nodes)
        if len(nodes) == 1 or (reader and nodes and len({n.input[0] for n in nodes}) == 1):
            return nodes[0]
        return None

    def add_input(self, name: str, shape: list[Any]) -> str:
        from onnx import helper

        self.model.graph.input.append(helper.make_tensor_value_info(name, FLOAT, shape))
        return name


def add_delta_slots(model: Any, onnx_path: Path) -> int:
    """Rewrite ``onnx_path`` (optimum's float32 export of ``model``) with delta slots; return how many layers
    got one. A layer the graph does not show as one MatMul is refused by name."""
    import onnx

    proto = onnx.load(str(onnx_path))
    g = _Graph.index(proto)
    layers = targets(model)
    if not layers:
        raise UnsupportedArchitecture(f"--delta-slots: {type(model).__name__} has no nn.Linear layers outside its "
                                      "output head, so it cannot take deltas; build without --delta-slots")
    for path, (first, last) in layers.items():
        _linear_slot(g, path, first, last)
    _dense_slots(g, model, layers)
    _place(g)
    for p in [p for p in proto.metadata_props if p.key == DELTA_SLOTS_KEY]:
        proto.metadata_props.remove(p)
    proto.metadata_props.add(key=DELTA_SLOTS_KEY, value=json.dumps(g.slots))
    _save(proto, onnx_path)
    return len(layers)


def _linear_slot(g: _Graph, path: str, first: Any, last: Any) -> None:
    from onnx import helper

    reader, writer = g.matmul(first, path, reader=True), g.matmul(last, path, reader=False)
    if reader is None or writer is None:
        raise UnsupportedArchitecture(f"--delta-slots: layer {path} is not one MatMul in optimum's graph of this "
                                      "model, so no side branch can be added to it; build without --delta-slots")
    x, y = reader.input[0], writer.output[0]
    rank = f"delta_{path}_rank"
    a = g.add_input(f"delta.{path}.a", [int(first.in_features), rank])
    b = g.add_input(f"delta.{path}.b", [rank, int(last.out_features)])
    g.slots.append({"a": a, "b": b, "n_in": int(first.in_features), "parts": [[path, int(last.out_features)]]})
    nodes = [helper.make_node("MatMul", [x, a], [f"{path}/delta_a"], name=f"{path}/delta_a"),
             helper.make_node("MatMul", [f"{path}/delta_a", b], [f"{path}/delta_b"], name=f"{path}/delta_b"),
             helper.make_node("Add", [y, f"{path}/delta_b"], [f"{path}/with_delta"], name=f"{path}/add_delta")]
    if last.bias is not None:  # a fine-tune moves biases too (Qwen2's q/k/v); the base bias stays in the graph
        bias = g.add_input(f"delta.{path}.bias", [int(last.out_features)])
        g.slots.append({"dense": f"{path}.bias", "input": bias, "shape": [int(last.out_features)]})
        nodes.append(helper.make_node("Add", [nodes[-1].output[0], bias], [f"{path}/with_bias_delta"],
                                      name=f"{path}/add_bias_delta"))
    g.renames.append((y, nodes[-1].output[0], nodes[2]))
    g.after.setdefault(y, []).extend(nodes)


def _dense_slots(g: _Graph, model: Any, layers: dict[str, tuple[Any, Any]]) -> None:
    """A zero-default input added to each 1-D parameter outside the linear layers (norm weights and biases)
    that a node in its module's scope reads as an initializer of equal value; others get none (a delta that
    changes one is refused at load, by name)."""
    from onnx import helper

    linear_params = {id(p) for first, last in layers.values() for m in (first, last) for p in m.parameters()}
    for name, param in model.named_parameters():
        if param.dim() != 1 or id(param) in linear_params:
            continue
        found = _reader(g, scopes(name.rsplit(".", 1)[0]), param.detach().float().numpy())
        if found is None:
            continue
        node, i = found
        delta = g.add_input(f"delta.{name}", list(param.shape))
        g.slots.append({"dense": name, "input": delta, "shape": list(param.shape)})
        source = g.aliases.get(node.input[i], node.input[i])  # the initializer itself: there from the start
        g.before.append(helper.make_node("Add", [source, delta], [f"{name}/with_delta"], name=f"{name}/add_delta"))
        node.input[i] = f"{name}/with_delta"


def _reader(g: _Graph, prefixes: list[str], value: np.ndarray) -> tuple[Any, int] | None:
    """The first node under the longest of ``prefixes`` that any node has, reading an initializer equal to
    ``value`` (or an Identity of one: torch's exporter keeps one copy of equal parameters, such as freshly
    initialized norm weights), and which input."""
    prefix = next((p for p in prefixes if any(n.name.startswith(p) for n in g.model.graph.node)), None)
    for node in g.model.graph.node if prefix else ():
        if node.name.startswith(prefix):
            for i, name in enumerate(node.input):
                init = g.inits.get(g.aliases.get(name, name))
                if init is not None and init.shape == value.shape and np.array_equal(init, value):
                    return node, i
    return None


def _place(g: _Graph) -> None:
    """The new nodes in topological order (constant-side Adds first, each side branch after its layer's MatMul),
    then every reader of a layer's output reads it with the delta added (side branches of later layers too)."""
    nodes = list(g.before)
    for node in g.model.graph.node:
        nodes.append(node)
        nodes.extend(g.after.get(node.output[0], ()) if node.output else ())
    for old, new, producer in g.renames:
        for node in nodes:
            if node is not producer:
                for i, name in enumerate(node.input):
                    if name == old:
                        node.input[i] = new
    del g.model.graph.node[:]
    g.model.graph.node.extend(nodes)


def _save(proto: Any, onnx_path: Path) -> None:
    """Write beside the original, then replace it: external data if the export had any (large models)."""
    import onnx

    data = [f for f in onnx_path.parent.iterdir() if f.name.startswith(onnx_path.name) and f != onnx_path]
    staging = onnx_path.parent / f".{onnx_path.name}.slots"
    staging.mkdir()
    try:
        if data:
            onnx.save_model(proto, str(staging / onnx_path.name), save_as_external_data=True,
                            location=data[0].name, all_tensors_to_one_file=True)
        else:
            onnx.save_model(proto, str(staging / onnx_path.name))
        for f in data:
            f.unlink()
        for f in staging.iterdir():
            f.replace(onnx_path.parent / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _key(array: np.ndarray) -> bytes:
    """A digest of a [n_in, n_out] operand's shape and float32 values."""
    contiguous = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(str(contiguous.shape).encode() + contiguous.tobytes(), digest_size=16).digest()


def _operand_key(node: Any, digest: bytes, weight: Any) -> bytes | None:
    """How ``node``'s constant operand is indexed: its digest for a MatMul or a plain Gemm (2-D inputs: OPT's
    projections); a Gemm with transB holds W itself, marked so ``matmul`` looks it up as W, not Wᵀ."""
    from onnx import helper

    if node.op_type == "MatMul":
        return digest
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return None
    return b"T" + digest if attrs.get("transB", 0) else digest
