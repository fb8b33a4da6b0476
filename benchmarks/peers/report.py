"""The peers benchmark's outputs: a Markdown table with its header, a JSON record, a PNG bar chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One system's measurements; times in seconds, one entry per round."""

    name: str
    size_bytes: int | None
    first_short_s: list[float] = field(default_factory=list)
    full_short_s: list[float] = field(default_factory=list)
    first_long_s: list[float] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    load_s: float | None = None
    perplexity: float | None = None
    note: str = ""

    def decode_rate(self, new_tokens: int) -> float | None:
        """Median over rounds of (N - 1) / (t_N - t_1): tokens after the first, per second."""
        rates = [(new_tokens - 1) / (tn - t1) for t1, tn in zip(self.first_short_s, self.full_short_s) if tn > t1]
        return statistics.median(rates) if rates else None

    def median_ms(self, times: list[float]) -> float | None:
        return statistics.median(times) * 1000 if times else None


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def table(rows: list[Row], new_tokens: int, ppl_windows: int) -> str:
    headers = ["system", "decode tokens/s", "first token, short prompt (ms)", "first token, 256-token prompt (ms)",
               "peak RSS (MB)", "size on disk (MB)", f"perplexity ({ppl_windows} windows)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r.name + (f" ({r.note})" if r.note else ""), _fmt(r.decode_rate(new_tokens)),
                 _fmt(r.median_ms(r.first_short_s), 0), _fmt(r.median_ms(r.first_long_s), 0),
                 _fmt(r.peak_rss_bytes / 1e6 if r.peak_rss_bytes else None, 0),
                 _fmt(r.size_bytes / 1e6 if r.size_bytes else None, 0), _fmt(r.perplexity, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_json(rows: list[Row], meta: dict, path: Path) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def plot(rows: list[Row], new_tokens: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.decode_rate(new_tokens) is not None]
    names = [r.name for r in shown]
    panels = [("decode tokens/s (higher is better)", [r.decode_rate(new_tokens) for r in shown]),
              ("first token, 256-token prompt, ms (lower is better)", [r.median_ms(r.first_long_s) for r in shown]),
              ("peak RSS, MB (lower is better)", [(r.peak_rss_bytes or 0) / 1e6 for r in shown])]
    colors = ["tab:blue" if n.startswith("edgepack") else "tab:orange" if "llama" in n else "tab:gray"
              for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(shown) + 1.8), sharey=True)
    for ax, (label, values) in zip(axes, panels):
        values = [v or 0 for v in values]
        ax.barh(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}" if v >= 100 else f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlabel(label, fontsize=9)
        ax.margins(x=0.2)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
