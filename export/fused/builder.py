"""A small ONNX graph builder: named nodes, initializers from numpy, unique names.

Kept apart from the Llama layout so the layout reads as a list of operations, not protobuf calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OPSET = 17


class GraphBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; the array is stored as given (contiguous), never reshaped here."""
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: Sequence[int] | np.ndarray, dtype: type = np.int64) -> str:
        """A small shared constant (shapes, axes), deduplicated by value."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight("const", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], name: str, outputs: int = 1,
           domain: str = "", **attrs: Any) -> list[str]:
        """Add a node; returns its output names (``name`` for one output, ``name.i`` for more)."""
        node_name = self.unique(name)
        outs = [node_name] if outputs == 1 else [self.unique(f"{node_name}.{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs

    def op_named(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
                 domain: str = "", **attrs: Any) -> None:
        """Add a node whose outputs are named by the caller ("" skips an optional output)."""
        self._names.update(o for o in outputs if o)
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.unique(name),
                                           domain=domain, **attrs))

    def op1(self, op_type: str, inputs: Sequence[str], name: str, domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]

    def add_input(self, name: str, elem: int, shape: Sequence[int | str]) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def add_output(self, source: str, name: str, elem: int, shape: Sequence[int | str]) -> None:
        """Expose ``source`` as a graph output called ``name`` (through Identity when they differ)."""
        if source != name:
            self.nodes.append(helper.make_node("Identity", [source], [name], name=self.unique(name + "_id")))
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def to_model(self, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """The model; ``metadata`` goes into its metadata_props (onnxruntime's custom_metadata_map)."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="edgepack")
        model.ir_version = 10
        helper.set_model_props(model, metadata or {})
        return model


def trimmed(inputs: Sequence[str]) -> list[str]:
    """A node's inputs without their trailing empty (omitted optional) names."""
    inputs = list(inputs)
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write the graph to ``path`` and every weight over 1 KB to ``path.data``; return both files.

    External data is what onnxruntime memory-maps instead of parsing into its heap, so the weights it
    keeps as they are (the embedding table) stay file pages the runtime can give back after loading
    (runtime/pages.py); it also lifts protobuf's 2 GB limit. Packages with one model.onnx still load.
    """
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
