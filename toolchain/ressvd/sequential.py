"""Propagation-aware truncation: compress layer by layer, correcting each for the errors upstream.

Two streams of calibration activations run through the decoder side by side: the dense model's
(X) and the partly compressed model's (X̂). Each group of linear layers fed the same tensor is
replaced by the whitened truncation of a ridge-regularized least-squares map from X̂ to the dense
outputs (correction.py: the map, the ridge and its choice on held-out windows). Groups are treated
in execution order (q/k/v, then o, then gate/up, then down), so each sees the inputs its compressed
predecessors make: per layer, one dense pass records the inputs, and one compressed pass replaces
each group from inside its first module's call.

The decoder layers are run one at a time with the arguments captured at the first layer's call,
as GPTQ-style tools do, which works for any architecture whose layers share one call signature.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from edgepack.toolchain.ressvd import allocation, correction, factorize, joint, selection
from edgepack.toolchain.ressvd.calibration import gram_f64
from edgepack.toolchain.ressvd.layers import factorized_linear, set_module
from edgepack.toolchain.ressvd.tune import Trace
from torch import nn
from tqdm import tqdm


class _Stop(Exception):
    pass


def _capture_first_layer(model: nn.Module, layers: nn.ModuleList, windows: Sequence[Sequence[int]]):
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.tensor([list(w) for w in windows]), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _dense_pass(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, chosen: dict[str, nn.Module]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The layer's output, the input reaching each chosen module (in the order they ran), and X·Wᵀ of each
    chosen module narrower than its input (its output less the bias: the correction's cheaper cross term)."""
    seen: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(module, args):
            seen[name] = args[0]  # kept whole: identity tells which modules share an input

        return hook

    def keep(name):
        def hook(module, args, output):
            products[name] = output if module.bias is None else output - module.bias

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in chosen.items()]
    handles += [m.register_forward_hook(keep(n)) for n, m in chosen.items() if m.out_features < m.in_features]
    return _run_hooked(layer, hidden, kwargs, handles), seen, products


def _run_hooked(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, handles: list) -> torch.Tensor:
    """The layer's output with ``handles``' hooks active; they are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            return _run(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()


def _groups(order: list[str], inputs: dict[str, torch.Tensor]) -> list[list[str]]:
    """Linear layers fed the same tensor form a group (q/k/v; gate/up), in execution order."""
    groups: list[list[str]] = []
    for name in order:
        if groups and inputs[name] is inputs[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def corrected_factors(weight: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, rank: int, damping: float,
                      truncate: Callable | None = None, ridge: float | str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of one layer; ``compress_sequential_`` fits whole groups the same way."""
    return _fit_group([weight], x, x_hat, [rank], damping, truncate, ridge)[0][0]


def _fit_group(weights: list[torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, ranks: list[int], damping: float,
               truncate: Callable | None, ridge: float | str, stacked: bool = False,
               product: torch.Tensor | None = None):
    """Per weight, the factors of its corrected map; ``stacked``: one pair (A, B) of the maps stacked at
    ``ranks[0]`` (a joint group: the maps share the whitening S, so one truncation covers them all).
    ``product``: X·Wᵀ of a one-module group, from the dense pass (correction.Moments.narrow)."""
    wc = None
    if ridge == "auto" and x.dim() == 3 and x.shape[0] >= 2:
        lam, moments, curve = correction.choose_ridge(weights, x, x_hat, damping)
    else:
        lam = correction.FALLBACK_RIDGE if ridge == "auto" else float(ridge)
        if product is not None:
            (moments, wc), curve = correction.Moments.narrow(product, x_hat), {}
        else:
            moments, curve = correction.Moments.of(x, x_hat), {}
    maps, s = correction.corrected_map(weights, moments, lam, damping, wc)
    cut = truncate or factorize.whitened
    if stacked:
        return [cut(torch.cat(maps), ranks[0], s)], lam, curve
    return [cut(w, r, s) for w, r in zip(maps, ranks)], lam, curve


def compress_sequential_(model: nn.Module, ranks: dict[str, int], windows: Sequence[Sequence[int]],
                         damping: float = 1e-4, truncate: Callable | None = None,
                         ridge: float | str = "auto", trace: list[Trace] | None = None,
                         joint_groups: Sequence[Sequence[str]] = (), allocate: bool = False) -> list[dict]:
    """Replace every module in ``ranks`` by corrected factors, layer by layer, in place; returns, per
    group, the ridge chosen and its held-out curve. ``trace``, when given, receives the streams the
    factor tune needs (tune.py). Each of ``joint_groups`` (joint.py) gets one shared factor pair.
    ``allocate``: each layer's ranks re-spread over its modules by their whitened spectra (allocation.py),
    same parameters per layer; ``ranks`` is updated in place."""
    layers = selection.decoder_layers(model)
    per_layer = selection.target_linears(model, list({n.rsplit(".", 1)[-1] for n in ranks}))
    dense_h, kwargs = _capture_first_layer(model, layers, windows)
    comp_h, log, first = dense_h, [], None
    for index, layer in enumerate(tqdm(layers, desc="compressing layers", unit="layer")):
        chosen = {n: m for n, m in per_layer[index] if n in ranks}
        if chosen and first is None:
            first = (index, dense_h)  # up to here the compressed stream is the dense one
        if not chosen:
            with torch.no_grad():
                new_dense = _run(layer, dense_h, kwargs)
                comp_h = _run(layer, comp_h, kwargs) if comp_h is not dense_h else new_dense
            dense_h = new_dense
            continue
        dense_h, dense_in, products = _dense_pass(layer, dense_h, kwargs, chosen)
        if allocate:
            _reallocate(ranks, chosen, dense_in)
        fit = functools.partial(_fit_group, damping=damping, truncate=truncate, ridge=ridge)
        groups = [tuple(g) for g in _groups(list(dense_in), dense_in)]
        shared = {tuple(g) for g in joint_groups if g[0] in chosen}
        if shared - set(groups):  # a joint group must be exactly the modules fed one tensor
            raise ValueError(f"joint groups {sorted(shared - set(groups))} do not each read one input alone")
        stand_ins = {g[0]: _FitOnCall(model, list(g), chosen, dense_in[g[0]], ranks, fit, log, g in shared,
                                      products.get(g[0]) if len(g) == 1 else None)
                     for g in groups}
        comp_h = _run_fitting(model, layer, comp_h, kwargs, stand_ins, chosen)
    if trace is not None and first is not None:
        trace.append(Trace(first=first[0], inputs=first[1], kwargs=kwargs, teacher=dense_h))
    return log


def _reallocate(ranks: dict[str, int], chosen: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> None:
    names, grams = list(chosen), {}
    for n in names:  # q/k/v and gate/up read one tensor: one XᵀX each
        if id(inputs[n]) not in grams:
            grams[id(inputs[n])] = gram_f64(inputs[n].reshape(-1, inputs[n].shape[-1]))
    spectra = [allocation.energy_spectrum(chosen[n].weight, grams[id(inputs[n])]) for n in names]
    new = allocation.allocate([tuple(chosen[n].weight.shape) for n in names], spectra, [ranks[n] for n in names])
    ranks.update(zip(names, new))


def _run_fitting(model: nn.Module, layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                 stand_ins: dict[str, nn.Module], chosen: dict[str, nn.Module]) -> torch.Tensor:
    """The compressed pass: each group's first module is a stand-in that fits the group when called; a stand-in
    never called (a pass that failed) is put back to the original module."""
    for name, stand_in in stand_ins.items():
        set_module(model, name, stand_in)
    try:
        with torch.no_grad():
            return _run(layer, hidden, kwargs)
    finally:
        for name, stand_in in stand_ins.items():
            if model.get_submodule(name) is stand_in:
                set_module(model, name, chosen[name])


class _FitOnCall(nn.Module):
    """Stands in for a group's first module in the compressed pass, whose input is X̂: the call fits and
    replaces the group, then returns the new first module's output, so the modules after it see corrected
    outputs (one compressed pass per layer, and no dense product computed only to be thrown away)."""

    def __init__(self, model: nn.Module, group: list[str], chosen: dict[str, nn.Module], x: torch.Tensor,
                 ranks: dict[str, int], fit: Callable, log: list[dict], stacked: bool = False,
                 product: torch.Tensor | None = None) -> None:
        super().__init__()
        # Plain attributes, not submodules: the stand-in must not re-register the model or the dense layers.
        self.__dict__.update(_model=model, _group=group, _chosen=chosen, _x=x, _ranks=ranks, _fit=fit,
                             _log=log, _stacked=stacked, _product=product)

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        model, group, chosen = self._model, self._group, self._chosen
        factors, lam, curve = self._fit([chosen[n].weight.detach() for n in group], self._x, x_hat,
                                        [self._ranks[n] for n in group], stacked=self._stacked,
                                        product=self._product)
        if self._stacked:
            members = [chosen[n] for n in group]
            pairs = joint.shared_pairs(*factors[0], [m.out_features for m in members], [m.bias for m in members],
                                       members[0].weight.dtype)
            for name, pair in zip(group, pairs):
                set_module(model, name, pair)
        for name, (a, b) in ([] if self._stacked else zip(group, factors)):
            set_module(model, name, factorized_linear(a, b, chosen[name].bias, chosen[name].weight.dtype))
        self._log.append({"group": group, "ridge": lam, "holdout": {str(k): v for k, v in curve.items()}})
        return model.get_submodule(group[0])(x_hat)
