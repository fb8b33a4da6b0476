"""Real fine-tunes of the default model for the delta benchmark (#6), cached as Hugging Face folders.

    python benchmarks/deltas/finetune.py [--domain docs|code|all] [--steps N] [--eval-windows N]

Each fine-tune trains the default model on one domain's ``train`` split (``domains.py``) in PyTorch
on the CPU and updates ONLY the decoder's linear weights (q/k/v/o/gate/up/down_proj): the embedding,
the norms and the (tied) LM head stay frozen, because the runtime applies deltas to linear layers
only, so a delta of anything else could not be shipped. AdamW without weight decay (decay would add
a full-rank shrink of every weight to the delta, which is not what a fine-tune learns), warmup then
cosine decay, gradient clipping, a fixed seed and a fixed order of 256-token sequences.

A fine-tune is saved (safetensors + tokenizer files, so ``edgepack build FOLDER`` and
``sources.load(FOLDER)`` take it) to ``$EDGEPACK_CACHE/finetunes/<domain>-<hash>``, the hash covering
the settings, the base model's sha256 and the training text's; later calls reuse it. The base model
is written the same way (``base()``) when ``default`` is the GGUF, so both sides of a delta are plain
folders. The command measures held-out perplexity of base and fine-tunes on both domains and writes
``results/finetunes.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domains import DOMAINS, fingerprint, text  # noqa: E402
from edgepack.toolchain.default_model import locked  # noqa: E402

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECORD = "finetune.json"  # written last into each folder: its presence marks a complete cache entry


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tune; every field is part of the cache key."""

    domain: str
    steps: int = 40
    lr: float = 1e-4  # peak; with the decay, a clear held-out gain in 40 small steps
    batch: int = 1  # sequences per step: a 256-token step took 16-20 s on this busy 2-core machine
    seq_len: int = 256
    warmup: int = 4  # steps of linear warmup, then cosine decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.1
    clip: float = 1.0  # max gradient norm
    seed: int = 0
    # One thread: with the 2 cores shared, torch's two threads wait on each other (measured 100 s a
    # step against 16-20 s with one), and a fixed thread count keeps the float sums reproducible.
    threads: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose one of {', '.join(DOMAINS)}")
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2 or not 0 <= self.warmup < self.steps + 1:
            raise ValueError(f"bad fine-tune settings: {self}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")


# The benchmark's settings per domain. Code is predictable text the base already models well
# (perplexity ~8), so it takes more tokens and a higher rate than prose for a clear gain: with the
# docs settings its held-out perplexity fell only 7.93 -> 7.29 (results/finetunes.md has the rest).
DEFAULTS = {"docs": FinetuneConfig(domain="docs"),
            "code": FinetuneConfig(domain="code", steps=48, batch=2, lr=1.5e-4)}


def cache_root() -> Path:
    from edgepack.toolchain.default_model import cache_dir

    return cache_dir() / "finetunes"


def _base_sha256() -> str:
    from edgepack.toolchain import sources

    source = sources.resolve(sources.DEFAULT)
    return source.sha256 or hashlib.sha256(source.path.encode()).hexdigest()


def base() -> Path:
    """The default model as a Hugging Face folder (made once from the GGUF; a folder source as is)."""
    from edgepack.toolchain import sources

    source = sources.resolve(sources.DEFAULT)
    if source.kind == "hf-folder":
        return Path(source.path)
    target = cache_root() / f"base-{_base_sha256()[:12]}"
    with locked(cache_root()):
        if not (target / RECORD).is_file():
            loaded = sources.load(sources.DEFAULT)
            _save(loaded.model, loaded.tokenizer, target, {"base": source.to_dict()})
    return target


def finetuned(domain: str, config: FinetuneConfig | None = None) -> Path:
    """The fine-tune of ``domain`` (default settings unless given), made first if it is not cached."""
    config = config or DEFAULTS[domain]
    if config.domain != domain:
        raise ValueError(f"config is for {config.domain!r}, not {domain!r}")
    base_path = base()
    key = {"config": dataclasses.asdict(config), "base_sha256": _base_sha256(),
           "train_text": fingerprint(domain, "train")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    target = cache_root() / f"{domain}-{digest}"
    with locked(cache_root()):
        if not (target / RECORD).is_file():
            from edgepack.toolchain import sources

            loaded = sources.load(str(base_path))
            ids = loaded.tokenizer(text(domain, "train"), add_special_tokens=False)["input_ids"]
            stats = train(loaded.model, ids, config)
            _save(loaded.model, loaded.tokenizer, target, {**key, "base_folder": str(base_path), **stats})
    return target


def _save(model: Any, tokenizer: Any, target: Path, record: dict[str, Any]) -> None:
    from edgepack.runtime.files import atomic_dir

    with atomic_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def trainable_parameters(model: Any) -> list[Any]:
    """Freeze everything but the decoder's linear weights; return those."""
    params = []
    for name, p in model.named_parameters():
        keep = name.rsplit(".", 2)[-2] in LINEAR_NAMES and name.endswith(".weight")
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    if not params:
        raise ValueError("the model has no q/k/v/o/gate/up/down_proj linear weights to fine-tune")
    return params


def batches(ids: list[int], config: FinetuneConfig) -> Iterator[Any]:
    """``config.steps`` batches of non-overlapping sequences in a seeded order (reshuffled per epoch)."""
    import torch

    n = len(ids) // config.seq_len
    if n < config.batch:
        raise ValueError(f"{len(ids)} training tokens make fewer than {config.batch} sequences of {config.seq_len}")
    seqs = torch.tensor(ids[: n * config.seq_len]).view(n, config.seq_len)
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(config.steps):
        if pos + config.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield seqs[order[pos:pos + config.batch]]
        pos += config.batch


def _lr_factor(step: int, config: FinetuneConfig) -> float:
    import math

    if step < config.warmup:
        return (step + 1) / (config.warmup + 1)
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def train(model: Any, ids: list[int], config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` in place on token ids; return losses and timings."""
    import torch

    torch.manual_seed(config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(model, ids, config, progress)
    finally:
        torch.set_num_threads(threads)


def _train(model: Any, ids: list[int], config: FinetuneConfig, progress: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    model.train()
    losses, step_seconds = [], []
    start = time.perf_counter()
    bar = tqdm(batches(ids, config), total=config.steps, desc=f"fine-tune {config.domain}",
               disable=not progress, file=sys.stderr)
    for x in bar:
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"losses": losses, "median_step_seconds": round(statistics.median(step_seconds), 2),
            "train_seconds": round(time.perf_counter() - start, 1), "train_tokens": len(ids),
            "trained_tokens": config.steps * config.batch * config.seq_len}


def perplexity(model: Any, tokenizer: Any, text_: str, context: int = 512, max_windows: int | None = None):
    """Perplexity in PyTorch by the runtime's own windows and arithmetic (``runtime.perplexity``)."""
    from edgepack.runtime.perplexity import perplexity as windowed
    from edgepack.toolchain.evaluate import torch_forward

    model.eval()
    ids = tokenizer(text_, add_special_tokens=False)["input_ids"]
    return windowed(torch_forward(model), ids, context, max_windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=(*DOMAINS, "all"), default="all")
    parser.add_argument("--steps", type=int, help="default: the domain's (DEFAULTS)")
    parser.add_argument("--lr", type=float, help="peak learning rate; default: the domain's")
    parser.add_argument("--batch", type=int, help="sequences of 256 tokens per step; default: the domain's")
    parser.add_argument("--context", type=int, default=512, help="perplexity window in tokens")
    parser.add_argument("--eval-windows", type=int, default=16, help="test windows per domain (0: all)")
    parser.add_argument("--eval-threads", type=int, default=1, help="torch threads for perplexity (1: busy machine)")
    parser.add_argument("--no-eval", action="store_true", help="only make (or find) the fine-tunes")
    args = parser.parse_args()

    import torch
    from common import markdown_table, results_dir
    from edgepack.toolchain import sources

    torch.set_num_threads(args.eval_threads)
    chosen = DOMAINS if args.domain == "all" else (args.domain,)
    folders = {"base": base()}
    for domain in chosen:
        given = {k: getattr(args, k) for k in ("steps", "lr", "batch") if getattr(args, k) is not None}
        folders[domain] = finetuned(domain, dataclasses.replace(DEFAULTS[domain], **given))
        print(f"{domain}: {folders[domain]}", file=sys.stderr)
    if args.no_eval:
        return
    rows = []
    for name, folder in folders.items():
        loaded = sources.load(str(folder))
        record = json.loads((folder / RECORD).read_text())
        ppl = [perplexity(loaded.model, loaded.tokenizer, text(d, "test"), args.context, args.eval_windows or None)
               for d in DOMAINS]
        c = record.get("config", {})
        settings = f"{c['steps']} x {c['batch']} x {c['seq_len']}, lr {c['lr']:g}" if c else "-"
        rows.append([name if name == "base" else f"fine-tune {name}", *(f"{r.perplexity:.3f}" for r in ppl),
                     settings, record.get("median_step_seconds", "-"), record.get("train_seconds", "-"),
                     folder.name])
        print(rows[-1], file=sys.stderr)
    windows = ", ".join(f"{d} {r.windows} windows / {r.tokens} tokens" for d, r in zip(DOMAINS, ppl))
    table = markdown_table(["model", *(f"{d} test ppl" for d in DOMAINS), "steps x batch x tokens",
                            "step s (median)", "fine-tune s",
                            "folder"], rows)
    note = (f"Held-out perplexity in PyTorch, context {args.context} ({windows}). Made by "
            f"`python benchmarks/deltas/finetune.py {' '.join(sys.argv[1:])}` (settings: DEFAULTS unless "
            f"given).\n\n")
    # One domain alone writes its own file: the combined table keeps the rows of every domain.
    out = results_dir(__file__) / ("finetunes.md" if args.domain == "all" else f"finetunes-{args.domain}.md")
    out.write_text("# Fine-tunes of the default model\n\n" + note + table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
