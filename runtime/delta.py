"""Applying a fine-tune delta at load time, without touching the base weights.

A package built with ``--delta-slots`` has, beside every decoder linear layer, a low-rank side branch
y += (x·A)·B whose A and B are graph inputs (export/fused/linear.py). Loading a delta fills them
from its factors (ΔW = U·Vᵀ gives A = V, B = Uᵀ; the layers of a packed projection side by side in A,
block-diagonal in B); no delta binds rank-0 factors, which cost nothing. This works the same for a
float32, an int4 or a ResSVD-factorized base, whose weights cannot simply have ΔW added, and
switching deltas only rebinds a few small arrays: the base session is never reloaded. Norm weights
the delta changes are graph inputs too (added to the base's; zeros without a delta). A slot with ``rows``
outputs its layers' rows in that order (the source row of each graph row), and a delta's rows are taken in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from edgepack.runtime import delta_file
from edgepack.runtime.delta_file import Delta
from edgepack.runtime.errors import PackageError

DELTA_SLOTS_KEY = "edgepack.delta_slots"


class DeltaSlots:
    """The side-branch inputs of one onnxruntime session and the factors currently bound to them."""

    def __init__(self, session: ort.InferenceSession) -> None:
        text = session.get_modelmeta().custom_metadata_map.get(DELTA_SLOTS_KEY)
        try:
            self.slots: list[dict[str, Any]] = json.loads(text) if text else []
        except json.JSONDecodeError:
            raise PackageError(f"the graph's {DELTA_SLOTS_KEY} metadata is not JSON; rebuild the package") from None
        self._layers = {part[0]: (i, int(part[1])) for i, slot in enumerate(self.slots)
                        for part in slot.get("parts", ())}
        self._dense = {slot["dense"]: slot for slot in self.slots if "dense" in slot}
        self.version = 0  # bumped on every change, so decoders rebuild bindings that hold old factors
        self.current: Delta | None = None
        self.values: dict[str, ort.OrtValue] = {}
        self.set(None)

    @property
    def available(self) -> bool:
        return bool(self.slots)

    def check(self, delta: Delta) -> None:
        """Refuse a delta these slots cannot apply, naming the first layer that does not fit."""
        for name, array in delta.dense.items():
            if name not in self._dense:
                raise PackageError(f"the delta changes {name}, which this package cannot change at load time (it "
                                   "applies linear layers, their biases and norm weights); fine-tune with it frozen")
            if list(array.shape) != self._dense[name]["shape"]:
                raise PackageError(f"delta parameter {name} is {list(array.shape)}, the package's is "
                                   f"{self._dense[name]['shape']}")
        for name, layer in delta.layers.items():
            if name not in self._layers and ".experts." in name:
                # the fused graph's MoE op takes stacked expert weights, no side branches (export/fused/moe.py)
                raise PackageError(f"the delta changes expert layer {name}, and this package's mixture-of-experts op "
                                   "has no delta slots for experts; build the base with --graph optimum "
                                   "--delta-slots where optimum exports the model, or fine-tune with the experts "
                                   "frozen")
            if name not in self._layers:
                raise PackageError(f"the delta changes layer {name}, which this package has no delta slot for; "
                                   "was it made for another architecture?")
            slot = self.slots[self._layers[name][0]]
            if (layer.n_out, layer.n_in) != (self._layers[name][1], int(slot["n_in"])):
                raise PackageError(f"delta layer {name} is {layer.n_out}x{layer.n_in}, the package's is "
                                   f"{self._layers[name][1]}x{slot['n_in']}")

    def set(self, delta: Delta | None) -> None:
        """Bind ``delta``'s factors (None: no delta) to every slot."""
        if delta is not None:
            self.check(delta)
        values = {}
        for slot in self.slots:
            if "dense" in slot:
                change = delta.dense.get(slot["dense"]) if delta is not None else None
                array = np.zeros(slot["shape"], np.float32) if change is None else change.astype(np.float32)
                if change is not None and "rows" in slot:
                    array = array[np.asarray(slot["rows"])]
                values[slot["input"]] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
                continue
            a, b = _slot_factors(slot, delta)
            values[slot["a"]] = ort.OrtValue.ortvalue_from_numpy(a)
            values[slot["b"]] = ort.OrtValue.ortvalue_from_numpy(b)
        self.values = values
        self.current = delta
        self.version += 1

    def bind(self, binding: ort.IOBinding) -> None:
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)


def _slot_factors(slot: dict[str, Any], delta: Delta | None) -> tuple[np.ndarray, np.ndarray]:
    """A [n_in, Σk] and block-diagonal B [Σk, Σn_out] of one slot's parts."""
    factors = []
    for name, _ in slot["parts"]:
        layer = delta.layers.get(name) if delta is not None else None
        factors.append(layer.factors() if layer is not None else None)
    width = sum(f[0].shape[1] for f in factors if f is not None)
    a = np.zeros((int(slot["n_in"]), width), np.float32)
    b = np.zeros((width, sum(int(out) for _, out in slot["parts"])), np.float32)
    col = row = 0
    for (_, n_out), f in zip(slot["parts"], factors):
        if f is not None:
            u, v = f
            k = u.shape[1]
            a[:, col:col + k] = v
            b[col:col + k, row:row + int(n_out)] = u.T
            col += k
        row += int(n_out)
    if "rows" in slot:  # the graph orders this projection's outputs differently (GPT-NeoX's packed q/k/v)
        b = np.ascontiguousarray(b[:, np.asarray(slot["rows"])])
    return a, b


def load_delta(path: Path | str | Delta, weights_fingerprint: str | None) -> Delta:
    """Read (or take) a delta and check it was made against these base weights."""
    delta = path if isinstance(path, Delta) else delta_file.read(path)
    if weights_fingerprint is None:
        raise PackageError("this package does not record its weights' fingerprint (built by an older edgepack); "
                           "rebuild it to apply deltas")
    if delta.base_fingerprint != weights_fingerprint:
        raise PackageError(f"the delta was made for base weights {delta.base_fingerprint}, this package holds "
                           f"{weights_fingerprint}; make the delta against this package's source model")
    return delta
