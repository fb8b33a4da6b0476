"""Choose a delta's settings on validation text only: held-out loss of candidate deltas on the domain's
valid split, never on its test split (that is run.py's, for the final numbers).

    python benchmarks/deltas/probe.py --domain code --ranks 1 --candidates mag osd "mag+tune" "osd+tune"

The deltas are built exactly as run.py builds them (OSD's scores and the tune from ``--source-windows``
windows of 256 tokens of the fine-tune's training text); each is scored on every non-overlapping
256-token window of the valid split (disjoint from train and test: benchmarks/deltas/domains.py) by
the mean token NLL of base + delta and by KL(full fine-tune ‖ base + delta). Differences are paired per
window against the first candidate. Writes results/deltas-probe-TAG.md / .json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, results_dir  # noqa: E402

_TUNE = dict(tune_steps=16, tune_lr=3e-4)
CANDIDATES = {
    "mag": dict(method="magtruncsvd"),
    "osd": dict(method="osd", importance="fisher", tune_steps=0),  # the NLL Fisher: OSD's default before fisher-kl
    "mag+tune": dict(method="magtruncsvd", **_TUNE),
    "osd+tune": dict(method="osd", importance="fisher", **_TUNE),
    "mag c2": dict(method="magtruncsvd", relax_times=2),
    "osd c2": dict(method="osd", importance="fisher", tune_steps=0, relax_times=2),
    "mag c3": dict(method="magtruncsvd", relax_times=3),
    "osd c3": dict(method="osd", importance="fisher", tune_steps=0, relax_times=3),
    "mag c2+tune": dict(method="magtruncsvd", relax_times=2, **_TUNE),
    "osd c2+tune": dict(method="osd", importance="fisher", relax_times=2, **_TUNE),
    "osd c3+tune": dict(method="osd", importance="fisher", relax_times=3, **_TUNE),
    "osd layer": dict(method="osd", importance="fisher", tune_steps=0, allocation="layer"),
    "osd grad at ft": dict(method="osd", importance="fisher", tune_steps=0, gradient_at="finetune"),
    "osd kl": dict(method="osd", tune_steps=0, importance="fisher-kl"),
    "osd kl+tune": dict(method="osd", importance="fisher-kl", **_TUNE),
    # Selection during the tune (toolchain/delta/prune.py): dense rank-2r factors pruned to the budget while tuned.
    "osd prune": dict(method="osd", prune_during_tune=True, **_TUNE),
    "mag prune": dict(method="magtruncsvd", prune_during_tune=True, **_TUNE),
    "mag+tune32": dict(method="magtruncsvd", tune_steps=32, tune_lr=3e-4),
    "osd kl+tune32": dict(method="osd", importance="fisher-kl", tune_steps=32, tune_lr=3e-4),
    "osd prune32": dict(method="osd", prune_during_tune=True, tune_steps=32, tune_lr=3e-4),
    "mag prune32": dict(method="magtruncsvd", prune_during_tune=True, tune_steps=32, tune_lr=3e-4),
    "osd prune32 early": dict(method="osd", prune_during_tune=True, prune_until=0.25, tune_steps=32, tune_lr=3e-4),
    "osd c2 prune32": dict(method="osd", prune_during_tune=True, tune_steps=32, tune_lr=3e-4, relax_times=2),
    "osd kl c2+tune": dict(method="osd", importance="fisher-kl", relax_times=2, **_TUNE),
    "osd kl c3+tune": dict(method="osd", importance="fisher-kl", relax_times=3, **_TUNE),
    "osd kl layer": dict(method="osd", importance="fisher-kl", allocation="layer", tune_steps=0),
    "osd kl layer+tune": dict(method="osd", importance="fisher-kl", allocation="layer", **_TUNE),
    # A stronger tune: more steps, every position of each window (with --source-windows 32).
    "mag+tune48all": dict(method="magtruncsvd", tune_steps=48, tune_lr=3e-4, tune_positions=None),
    "osd kl+tune48all": dict(method="osd", importance="fisher-kl", tune_steps=48, tune_lr=3e-4, tune_positions=None),
    "osd prune48all": dict(method="osd", prune_during_tune=True, tune_steps=48, tune_lr=3e-4, tune_positions=None),
    # One re-selection at the tuned point (toolchain/delta/reselect.py): 16 steps, re-score, 16 more steps; its
    # equal-budget controls are "osd kl+tune32" and "mag+tune32".
    "osd kl reselect": dict(method="osd", importance="fisher-kl", reselect=True, **_TUNE),
    # OBD with the true Fisher (labels drawn from the model) at the fine-tune / at base + the rank-k delta.
    "osd tf@ft": dict(method="osd", importance="fisher-true", gradient_at="finetune", tune_steps=0),
    "osd tf@delta": dict(method="osd", importance="fisher-true", gradient_at="delta", tune_steps=0),
    "osd tf@ft+tune": dict(method="osd", importance="fisher-true", gradient_at="finetune", **_TUNE),
    "osd tf@delta+tune": dict(method="osd", importance="fisher-true", gradient_at="delta", **_TUNE),
    # The tune's loss half KL to the fine-tune, half the NLL of the training windows' own text.
    "osd kl+tune hard": dict(method="osd", importance="fisher-kl", tune_hard=0.5, **_TUNE),
    "mag+tune hard": dict(method="magtruncsvd", tune_hard=0.5, **_TUNE),
}


def held_out(model, raw, windows: list[list[int]]):
    """Per-window NLL scorer and KL-to-the-fine-tune scorer for deltas on ``windows``."""
    import torch
    from edgepack.runtime.perplexity import token_nll
    from edgepack.toolchain import distill
    from edgepack.toolchain.delta import tune
    from edgepack.toolchain.delta.merge import merged

    teacher = tune.teacher_states(model, raw, windows)
    head = model.get_output_embeddings()

    def score(delta) -> tuple[np.ndarray, np.ndarray]:
        nll, kl = [], []
        with merged(model, delta), torch.inference_mode():
            for i, w in enumerate(windows):
                states = tune.head_inputs(model, torch.tensor([w]))
                logits = head(states)[0].float().numpy()
                nll.append(float(token_nll(logits[:-1], np.asarray(w[1:])).mean()))
                kl.append(float(distill.sampled_kl(states, teacher[i:i + 1], head, None, None)))
        return np.asarray(nll), np.asarray(kl)

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="code")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1])
    parser.add_argument("--candidates", nargs="+", default=["mag", "osd"], choices=list(CANDIDATES))
    parser.add_argument("--source-windows", type=int, default=8, help="training-text windows for OSD and the tune")
    parser.add_argument("--tag", default="probe")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import domains
    import finetune
    import torch
    from edgepack.toolchain import sources
    from edgepack.toolchain.delta.extract import extract
    from edgepack.toolchain.delta.make import DeltaConfig, compress, needs_windows
    from edgepack.toolchain.ressvd.calibration import calibration_windows

    torch.set_num_threads(args.threads)
    base = sources.load(str(finetune.base()))
    raw = extract(base.model, sources.load(str(finetune.finetuned(args.domain))).model)
    tok = base.tokenizer
    source = calibration_windows(tok, domains.text(args.domain, "train"), args.source_windows, 256)
    ids = tok(domains.text(args.domain, "valid"), add_special_tokens=False)["input_ids"]
    valid = [ids[i:i + 256] for i in range(0, len(ids) - 255, 256)]
    score = held_out(base.model, raw, valid)
    rows, per_window, cache = [], {}, {}
    for rank in args.ranks:
        for label in args.candidates:
            options = dict(CANDIDATES[label])
            times = options.pop("relax_times", 1)
            config = DeltaConfig(rank=rank, relax=times * rank, windows=args.source_windows, **options)
            start = time.perf_counter()
            delta = compress(base.model, raw, config, source if needs_windows(config) else [], cache)
            seconds = time.perf_counter() - start
            nll, kl = score(delta)
            per_window[(label, rank)] = (nll, kl)
            row = {"rank": rank, "candidate": label, "valid_nll": round(float(nll.mean()), 5),
                   "valid_ppl": round(math.exp(nll.mean()), 4), "valid_kl": round(float(kl.mean()), 5),
                   "tune_kl_last": delta.info.get("tune", {}).get("kl_last_steps"), "seconds": round(seconds, 1),
                   "window_nll": [round(float(x), 6) for x in nll], "window_kl": [round(float(x), 6) for x in kl]}
            ref = per_window[(args.candidates[0], rank)]
            for name, a, b in (("nll", nll, ref[0]), ("kl", kl, ref[1])):
                d = a - b
                row[f"{name}_vs_first"] = f"{d.mean():+.4f} ± {d.std(ddof=1) / math.sqrt(len(d)):.4f}"
            rows.append(row)
            print(f"[{args.domain}] r={rank} {label}: valid NLL {nll.mean():.4f} ({row['nll_vs_first']}), "
                  f"KL {kl.mean():.4f} ({row['kl_vs_first']}), {seconds:.0f} s", file=sys.stderr, flush=True)
            _write(rows, args, len(valid))


def _write(rows: list[dict], args: argparse.Namespace, windows: int) -> None:
    out = results_dir(__file__)
    command = " ".join(f'"{a}"' if " " in a else a for a in sys.argv[1:])
    (out / f"deltas-{args.tag}.md").write_text(probe_markdown(rows, args.domain, command, windows))
    (out / f"deltas-{args.tag}.json").write_text(json.dumps(rows, indent=2))


def probe_markdown(rows: list[dict], domain: str, command: str, windows: int) -> str:
    """The results table (values to the digits the differences need; the shared table helper keeps one)."""
    table = [[r["rank"], r["candidate"], f'{r["valid_ppl"]:.4f}', f'{r["valid_nll"]:.5f}', r["nll_vs_first"],
              f'{r["valid_kl"]:.5f}', r["kl_vs_first"], "" if r["tune_kl_last"] is None else f'{r["tune_kl_last"]:.5f}',
              r["seconds"]] for r in rows]
    return "\n".join([f"# Delta settings on validation text ({domain})", "",
                      f"Command: `python benchmarks/deltas/probe.py {command}`",
                      f"Held out: {windows} windows x 256 tokens of the valid split; paired against the first "
                      "candidate (mean ± s.e.; negative = better).", "",
                      markdown_table(["r", "candidate", "valid ppl", "valid NLL", "Δ NLL vs first", "KL to fine-tune",
                                      "Δ KL vs first", "tune KL (train, last steps)", "s"], table)])


if __name__ == "__main__":
    main()
