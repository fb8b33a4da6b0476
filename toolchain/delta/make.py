"""``edgepack delta``: a base and a fine-tuned model in, a compressed delta out.

Flow: load both models → ΔW per linear layer (extract.py) → factor each at rank r (TruncSVD) or
r + c (MagTruncSVD, OSD) → keep entries within TruncSVD-at-r's bits (factorize.py), OSD scoring
them by gradient importance on validation text (importance.py) → a ``Delta`` (runtime/delta_file.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from edgepack.runtime.delta_file import Delta
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import budget, extract, factorize, importance
from edgepack.toolchain.delta.defaults import TUNE_LR, TUNE_STEPS
from tqdm import tqdm

METHODS = ("osd", "truncsvd", "magtruncsvd")
IMPORTANCE = ("taylor", "fisher", "fisher-kl", "fisher-true", "rms", "output")
GRADIENT_AT = ("delta", "finetune", "base")
# Scores that estimate a loss change, comparable across layers.
_LOSS_SCALED = ("taylor", "fisher", "fisher-kl", "fisher-true", "rms")
_FISHER = ("fisher", "fisher-kl", "fisher-true")  # the θ²·Σ_w g_w² scores (importance.fisher_scores)
ALLOCATION = ("layer", "global")


@dataclass(frozen=True)
class DeltaConfig:
    """``rank`` r sets the budget (TruncSVD at r); ``relax`` c the factor rank r + c of the sparse
    methods (default c = r). ``valid``: text for OSD's importance; None means the data-free fallback."""

    # The default is the best measured (benchmarks/deltas): magnitude selection beat OSD's Taylor
    # importance on both fine-tunes of the default model at every budget tried.
    method: str = "magtruncsvd"
    rank: int = 1
    relax: int | None = None
    valid: str | None = None
    windows: int = 8
    window_tokens: int = 256
    # OSD's entry score: "taylor" (|θ·∂L/∂θ|, the paper's), "fisher" (θ²·Σ_w g_w², one backward per
    # validation window), "fisher-kl" (the same with each window's loss KL(fine-tune ‖ model) instead of the
    # NLL of its text: only where the two models disagree counts), "fisher-true" (the same with labels drawn
    # from the model's own distribution: the true Fisher, OBD's Hessian at --gradient-at finetune), "rms"
    # (|θ|·sqrt(Σ_w g_w²)) or "output"
    # (the layer-output error of removing
    # the entry, from the validation inputs' X·Xᵀ; importance.output_scores).
    # None: the best measured for OSD (fisher-kl at the base with a global budget: chosen on the valid
    # splits of both benchmark domains, benchmarks/deltas/results/deltas-probe-*-kl.md).
    importance: str | None = None
    # Where the gradient is taken: base + the rank-(r+c) delta (the paper's), base + the full
    # fine-tune's ΔW, or the base alone.
    gradient_at: str | None = None
    # Divide each layer's scores by their mean before selection (matters for the global allocation only).
    normalize: bool = False
    # Fisher only: pull each entry's Fisher toward its factor's mean by this weight (importance.fisher_scores).
    shrink: float = 0.0
    # Fisher only: each factor's Fisher replaced by its separable (row × column) estimate (importance.fisher_scores).
    separable: bool = False
    # "layer": each matrix keeps TruncSVD-at-r's bits (the paper's); "global": one budget for the
    # whole delta, entries of all layers compete on score per bit (taylor scores only: they share a scale).
    allocation: str | None = None
    auto: bool = False  # choose c and the allocation by validation loss (make.auto)
    # Factor ΔW in the metric of the layer's validation inputs (ΔW·S, S·Sᵀ = X·Xᵀ + ridge): the
    # factors then minimize the layer-output error of the delta, not its weight error.
    whiten: bool = False
    # Re-solve the kept entries' values by least squares on ΔW once the pattern is chosen (factorize.refit).
    refit: bool = False
    # Distil the kept values toward the fine-tune for this many steps on the validation windows (tune.py):
    # same pattern, same bits, new values. 0: the values of the SVD. None: TUNE_STEPS for OSD with
    # validation text, else 0.
    tune_steps: int | None = None
    tune_lr: float = TUNE_LR
    tune_positions: int | None = 64  # positions per window whose logits enter a step's loss; None: all
    tune_hard: float = 0.0  # weight of the windows' own next-token NLL in the tune's loss beside the KL (tune.py)
    # Choose the kept entries during the tune instead of before it (prune.py): start from all entries of the
    # rank-k factors and prune on a cubic schedule to the budget while distilling, by the Fisher θ²·Σg² along
    # the tune (OSD) or by |θ| (MagTruncSVD, per layer). Needs validation text and tune steps.
    prune_during_tune: bool = False
    prune_until: float = 0.5  # share of the tune's steps after which the budget is reached
    # After the tune, score the entries again at the tuned point (OSD's Fisher), choose the pattern anew at the
    # same budget and tune it again (reselect.py): twice the tune steps in all.
    reselect: bool = False

    def __post_init__(self) -> None:
        osd = self.method == "osd"
        for name, value in (("importance", "fisher-kl" if osd else "taylor"),
                            ("gradient_at", "base" if osd else "delta"),
                            ("allocation", "global" if osd and self.importance in (None, *_LOSS_SCALED) else "layer")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.importance not in IMPORTANCE:
            raise UsageError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.allocation not in ALLOCATION:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATION)}, got {self.allocation!r}")
        if self.gradient_at not in GRADIENT_AT:
            raise UsageError(f"--gradient-at must be one of {', '.join(GRADIENT_AT)}, got {self.gradient_at!r}")
        if self.allocation == "global" and (self.method != "osd" or self.importance not in _LOSS_SCALED):
            raise UsageError("--allocation global needs OSD's taylor, fisher or rms importance: other scores are "
                             "not comparable across layers")
        if not self.shrink >= 0:
            raise UsageError(f"--shrink must be 0 or more, got {self.shrink}")
        if self.separable and (self.method != "osd" or self.importance not in _FISHER):
            raise UsageError("a separable Fisher needs --method osd with a fisher importance")
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.relax is not None and self.relax < 0:
            raise UsageError(f"--relax must be 0 or more, got {self.relax}")
        if (self.tune_steps or 0) < 0 or not self.tune_lr > 0:
            raise UsageError(f"--tune-steps must be 0 or more and --tune-lr above 0, got {self.tune_steps} and "
                             f"{self.tune_lr}")
        if self.prune_during_tune and (self.method == "truncsvd" or self.refit or self.tune_steps == 0):
            raise UsageError("--prune-during-tune needs a sparse method (osd, magtruncsvd), tune steps and no --refit")
        if not 0 < self.prune_until <= 1 or (self.tune_positions is not None and self.tune_positions < 1):
            raise UsageError(f"the share of the tune spent pruning must be in (0, 1] and the positions per window 1 or "
                             f"more, got {self.prune_until} and {self.tune_positions}")
        if not 0 <= self.tune_hard <= 1 or (self.tune_hard and self.prune_during_tune):
            raise UsageError(f"--tune-hard must be in [0, 1] and cannot go with --prune-during-tune, got "
                             f"{self.tune_hard}")
        if self.reselect and (self.method != "osd" or self.importance not in ("fisher", "fisher-kl")
                              or self.allocation != "global" or self.tune_steps == 0 or self.prune_during_tune):
            raise UsageError("--reselect re-scores OSD's fisher / fisher-kl selection (global budget) after its tune: "
                             "it needs --method osd, tune steps and no --prune-during-tune")
        if self.windows < 1 or self.window_tokens < 2:
            raise UsageError("validation needs at least one window of at least 2 tokens")

    @property
    def factor_rank(self) -> int:
        if self.method == "truncsvd":
            return self.rank
        return self.rank + (self.rank if self.relax is None else self.relax)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make(base: str, finetuned: str, config: DeltaConfig) -> Delta:
    """Load ``base`` and ``finetuned`` (default / HF folder / GGUF) and compress their delta."""
    from edgepack.toolchain import sources

    if (config.tune_steps or config.prune_during_tune) and config.valid is None:  # before minutes of loading
        raise UsageError("--tune-steps / --prune-during-tune distil the delta toward the fine-tune on validation "
                         "text: pass --valid FILE")
    base_model = sources.load(base)
    ft_model = sources.load(finetuned)
    raw = extract.extract(base_model.model, ft_model.model)
    del ft_model
    positions = getattr(base_model.model.config, "max_position_embeddings", None)
    if positions and config.window_tokens > positions:  # a learned position table has no row past its end
        config = replace(config, window_tokens=int(positions))
    windows = _validation_windows(base_model.tokenizer, config) if needs_windows(config) else []
    if config.auto:
        from edgepack.toolchain.delta.auto import auto

        return auto(base_model.model, raw, config, windows)
    return compress(base_model.model, raw, config, windows)


def compress(model: torch.nn.Module, raw: extract.RawDelta, config: DeltaConfig,
             windows: list[list[int]], cache: dict | None = None) -> Delta:
    """Compress ``raw`` (the delta of ``model``'s fine-tune) as ``config`` says. Pass the same ``cache``
    dict to several calls on one ``raw`` (other methods, ranks) to reuse SVDs and gradient passes."""
    start = time.perf_counter()
    changed = {n: d for n, d in raw.linears.items() if bool(d.abs().max() > 0)}
    if not changed and not raw.dense:
        raise UsageError("the two models have identical weights: there is no delta to compress")
    whitening = _whitening(model, changed, windows, cache) if config.whiten else {}
    factors = {n: factorize.svd_factors(d, config.factor_rank, cache, whitening.get(n))
               for n, d in tqdm(changed.items(), desc="factorizing ΔW", unit="layer", file=sys.stderr)}
    allowed = {n: budget.dense_bits(*d.shape, min(config.rank, *d.shape)) for n, d in changed.items()}
    if config.prune_during_tune:
        return _pruned_during_tune(model, raw, factors, allowed, config, windows, {} if cache is None else cache,
                                   start)
    scores, how = _scores(model, raw, factors, config, windows, {} if cache is None else cache, changed)
    if config.normalize and config.method == "osd" and windows:
        scores, how = importance.normalized(scores), how + ", normalized per layer"
    total_budget = sum(allowed.values())
    osd_with_text = config.method == "osd" and bool(windows)
    if config.method == "truncsvd":
        layers = {n: factorize.dense_layer(n, *factors[n]) for n in changed}
    elif config.allocation == "global" and windows:
        layers = factorize.select_global({n: (*factors[n], *scores[n]) for n in changed}, total_budget)
    else:
        layers = {n: factorize.sparse_layer(n, *factors[n], *scores[n], allowed[n]) for n in changed}
    if config.refit:
        layers = {n: factorize.refit(changed[n], layer) for n, layer in layers.items()}
    steps = config.tune_steps if config.tune_steps is not None else TUNE_STEPS if osd_with_text else 0
    tuned = _tune(model, raw, layers, config, steps, windows, {} if cache is None else cache) if steps else {}
    if tuned:
        layers = tuned.pop("layers")
    if tuned and config.reselect and windows:
        layers, tuned = _reselected(model, raw, factors, layers, tuned, total_budget, config, steps, windows,
                                    {} if cache is None else cache)
    info = {"method": config.method, "rank": config.rank, "relax": config.factor_rank - config.rank,
            "importance": how, "gradient_at": config.gradient_at if config.method == "osd" else None,
            "allocation": config.allocation if config.method == "osd" else "layer",
            "whitened": config.whiten, "refit": config.refit,
            "budget_bits": total_budget, "validation_windows": len(windows),
            "window_tokens": config.window_tokens, **tuned, "seconds": round(time.perf_counter() - start, 1)}
    dense = {n: d.numpy() for n, d in raw.dense.items()}
    return Delta(raw.base_fingerprint, layers, dense, info)


def _pruned_during_tune(model: torch.nn.Module, raw: extract.RawDelta,
                        factors: dict[str, tuple[torch.Tensor, torch.Tensor]], allowed: dict[str, int],
                        config: DeltaConfig, windows: list[list[int]], cache: dict, start: float) -> Delta:
    """The delta whose entries were chosen during the tune (prune.py) within ``allowed`` (name → bits), with the
    same metadata as ``compress``."""
    from edgepack.toolchain.delta import prune

    if not windows:
        raise UsageError("--prune-during-tune distils the delta toward the fine-tune on validation text: "
                         "pass --valid FILE")
    osd = config.method == "osd"
    settings = prune.PruneSettings(steps=config.tune_steps or TUNE_STEPS, lr=config.tune_lr,
                                   score="fisher" if osd else "magnitude", allocation=config.allocation,
                                   prune_until=config.prune_until, positions=config.tune_positions)
    layers, losses, kept = prune.gradual(model, factors, allowed, raw.dense, windows,
                                         _teacher(model, raw, windows, cache), settings)
    how = ("fisher θ²·Σ_t g_t² along the tune, loss KL(fine-tune ‖ model), pruned during the tune" if osd
           else "magnitude |θ|, pruned during the tune")
    record = {**_tune_record(losses, config.tune_lr, settings.batch, settings.positions), "pruned_during_tune": True,
              "prune_until": config.prune_until, "kept_bits_by_step": kept}
    info = {"method": config.method, "rank": config.rank, "relax": config.factor_rank - config.rank,
            "importance": how, "gradient_at": "the tuned delta" if osd else None, "allocation": settings.allocation,
            "whitened": config.whiten, "refit": False, "budget_bits": sum(allowed.values()),
            "validation_windows": len(windows), "window_tokens": config.window_tokens, "tune": record,
            "seconds": round(time.perf_counter() - start, 1)}
    return Delta(raw.base_fingerprint, layers, {n: d.numpy() for n, d in raw.dense.items()}, info)


def needs_windows(config: DeltaConfig) -> bool:
    """Whether ``config`` uses validation text (OSD's scores, whitening, the tune)."""
    return config.method == "osd" or config.whiten or bool(config.tune_steps) or config.prune_during_tune


def _tune(model: torch.nn.Module, raw: extract.RawDelta, layers: dict, config: DeltaConfig, steps: int,
          windows: list[list[int]], cache: dict) -> dict[str, Any]:
    """The kept values distilled toward the fine-tune (tune.py), and what the tune did for the metadata."""
    from edgepack.toolchain.delta import tune

    if not windows:
        raise UsageError("--tune-steps distils the delta toward the fine-tune on validation text: pass --valid FILE")
    settings = tune.TuneSettings(steps=steps, lr=config.tune_lr, positions=config.tune_positions,
                                 hard=config.tune_hard)
    out, losses = tune.tune(model, layers, raw.dense, windows, _teacher(model, raw, windows, cache), settings)
    record = _tune_record(losses, config.tune_lr, settings.batch, settings.positions)
    if config.tune_hard:  # the recorded losses are then the mixed loss, not the KL alone
        record["hard_nll_weight"] = config.tune_hard
    return {"layers": out, "tune": record}


def _reselected(model: torch.nn.Module, raw: extract.RawDelta, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                layers: dict, first: dict[str, Any], budget_bits: int, config: DeltaConfig, steps: int,
                windows: list[list[int]], cache: dict) -> tuple[dict, dict[str, Any]]:
    """The pattern chosen again at the tuned point (reselect.py) and tuned again; both tunes in the metadata."""
    from edgepack.toolchain.delta import reselect

    loss_fn = _kl_to_finetune(model, raw, windows, cache) if config.importance == "fisher-kl" else None
    chosen = reselect.reselect(model, factors, layers, raw.dense, windows, budget_bits, loss_fn)
    second = _tune(model, raw, chosen, config, steps, windows, cache)
    record = {"tune": second["tune"], "first_tune": first["tune"], "reselect": reselect.overlap(layers, chosen)}
    return second.pop("layers"), record


def _tune_record(losses: list[float], lr: float, batch: int, positions: int | None) -> dict[str, Any]:
    """What a tune did, for the delta's metadata: its settings and the mean loss of its first and last steps."""
    record = {"steps": len(losses), "lr": lr, "batch": batch, "positions": positions}
    if losses:  # none when the delta kept no entries to train
        record.update(kl_first_steps=round(sum(losses[:4]) / len(losses[:4]), 5),
                      kl_last_steps=round(sum(losses[-4:]) / len(losses[-4:]), 5))
    return record


def _teacher(model: torch.nn.Module, raw: extract.RawDelta, windows: list[list[int]], cache: dict) -> torch.Tensor:
    """The full fine-tune's head inputs on ``windows`` (tune.teacher_states), once per raw delta and windows."""
    from edgepack.toolchain.delta import tune

    key = ("teacher", id(raw), id(windows))
    if key not in cache:
        cache[key] = tune.teacher_states(model, raw, windows)
    return cache[key]


def _kl_to_finetune(model: torch.nn.Module, raw: extract.RawDelta, windows: list[list[int]], cache: dict
                    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A window's loss KL(fine-tune ‖ model) at every position: its gradient at the base is zero wherever
    the fine-tune agrees with the base, so the text's own unpredictability adds no noise to the scores."""
    from edgepack.toolchain import distill
    from edgepack.toolchain.delta import tune

    teacher, head = _teacher(model, raw, windows, cache), model.get_output_embeddings()
    return lambda i, ids: distill.sampled_kl(tune.head_inputs(model, ids), teacher[i:i + 1], head, None, None)


def _whitening(model: torch.nn.Module, changed: dict[str, torch.Tensor], windows: list[list[int]],
               cache: dict | None) -> dict[str, torch.Tensor]:
    """S per layer with S·Sᵀ = its validation inputs' X·Xᵀ plus a ridge of 1 % of the mean diagonal:
    a few thousand validation tokens leave X·Xᵀ ill-conditioned, and S⁻ᵀ would amplify its noise."""
    from edgepack.toolchain.ressvd.factorize import whitening

    if not windows:
        raise UsageError("--whiten factors the delta in the metric of the validation inputs: pass --valid FILE")
    key = ("whitening", id(windows))
    if cache is None or key not in cache:
        layers = {n: m for n, m in extract.linear_layers(model).items() if n in changed}
        grams = importance.input_grams(model, layers, windows)
        out = {}
        for name, gram in grams.items():
            ridge = 1e-2 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
            out[name] = whitening(gram + ridge, 1e-4)
        if cache is None:
            return out
        cache[key] = out
    return cache[key]


def _scores(model: torch.nn.Module, raw: extract.RawDelta, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
            config: DeltaConfig, windows: list[list[int]], cache: dict, changed: dict[str, torch.Tensor]
            ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    if config.method == "truncsvd":
        return {}, "none (dense factors)"
    magnitude = {n: (u.abs(), v.abs()) for n, (u, v) in factors.items()}
    if config.method == "magtruncsvd":
        return magnitude, "magnitude |θ|"
    if not windows:
        print("edgepack: no validation text given: OSD falls back to the data-free magnitude criterion "
              "(pass --valid FILE for Taylor importance)", file=sys.stderr)
        return magnitude, "magnitude |θ| (data-free fallback: no validation text)"
    if config.importance != "output":
        return _gradient_scores(model, raw, factors, config, windows, cache, changed)
    key = ("grams", id(windows))  # the output criterion needs only the layers' inputs: forward passes
    if key not in cache:
        cache[key] = importance.input_grams(model, {n: m for n, m in extract.linear_layers(model).items()
                                                    if n in factors}, windows)
    grams = cache[key]
    return ({n: importance.output_scores(u, v, grams[n]) for n, (u, v) in factors.items()},
            "output error U²·VᵀCV / V²·|U|²·C_ll from validation inputs")


def _gradient_scores(model: torch.nn.Module, raw: extract.RawDelta,
                     factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: DeltaConfig,
                     windows: list[list[int]], cache: dict, changed: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """Taylor / Fisher / rms scores from per-window gradients at ``config.gradient_at``."""
    kl = config.importance == "fisher-kl"
    sampled = config.importance == "fisher-true"
    key = ("factor-gradients", config.factor_rank, id(windows), config.gradient_at, config.whiten, kl, sampled)
    if key not in cache:
        loss_fn = (_kl_to_finetune(model, raw, windows, cache) if kl
                   else importance.sampled_nll(model) if sampled else None)
        layers = {n: m for n, m in extract.linear_layers(model).items() if n in factors}
        if config.gradient_at == "delta":
            shifts = {n: u @ v.T for n, (u, v) in factors.items()}
        elif config.gradient_at == "finetune":
            shifts = {n: changed[n] for n in factors}
        else:
            shifts = {n: torch.zeros(()) for n in factors}
        cache[key] = importance.factor_gradient_stats(model, layers, shifts, factors, windows, loss_fn)
    stats = cache[key]
    where = {"delta": "base + rank-k delta", "finetune": "the full fine-tune", "base": "the base"}[config.gradient_at]
    if config.importance == "taylor":
        return ({n: ((u * stats[n][0]).abs(), (v * stats[n][1]).abs()) for n, (u, v) in factors.items()},
                f"taylor |θ·∂L/∂θ| at {where}")
    if config.importance in _FISHER:
        loss = (", loss KL(fine-tune ‖ model)" if kl else
                ", labels drawn from the model (true Fisher)" if sampled else "")
        smoothing = f", shrunk λ={config.shrink:g} toward each factor's mean" if config.shrink else ""
        smoothing += ", separable (row × column) Fisher" if config.separable else ""
        return ({n: importance.fisher_scores(u, v, *stats[n][2:], config.shrink, config.separable)
                 for n, (u, v) in factors.items()},
                f"fisher θ²·Σ_w g_w² over {len(windows)} windows at {where}{loss}{smoothing}")
    return ({n: importance.rms_scores(u, v, *stats[n][2:]) for n, (u, v) in factors.items()},
            f"rms |θ|·sqrt(Σ_w g_w²) over {len(windows)} windows at {where}")


def _validation_windows(tokenizer: Any, config: DeltaConfig) -> list[list[int]]:
    if config.valid is None:
        return []
    from edgepack.runtime.text import read_text
    from edgepack.toolchain.ressvd.calibration import calibration_windows

    return calibration_windows(tokenizer, read_text(config.valid), config.windows, config.window_tokens)
