"""``bench``: time to first token, tokens/s and peak resident memory of a package, measured in a
fresh child process so that the peak RSS is the package's alone (not the caller's imports).

The child loads the package, optionally fills the KV cache to ``fill`` positions (fed in chunks of
``chunk`` tokens, as a long conversation would), then answers a fixed prompt set greedily, and reports
its own ``ru_maxrss``. Torch-free: this is what runs on a target.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.runtime.errors import EdgepackError, UsageError

PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences what a hash table is.",
    "Write a haiku about the sea.",
    "List three uses of a Raspberry Pi.",
)
CHILD_FLAG = "--edgepack-bench-child"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``fill``: KV positions to occupy before the prompts (0 = none), to measure
    the cache at a given context; ``chunk``: longest prefill fed at once (bounds the logits buffer)."""

    max_new_tokens: int = 32
    threads: int = 0
    fill: int = 0
    chunk: int = 256
    low_memory: bool = False  # onnxruntime's CPU arena and memory patterns off
    prepacking: bool = True
    optimization: str = "all"  # onnxruntime graph optimization level (see SessionSettings)
    prompts: tuple[str, ...] = PROMPTS
    version: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.threads < 0 or self.fill < 0 or self.chunk < 1:
            raise UsageError("bench: max_new_tokens and chunk must be >= 1, threads and fill >= 0")
        object.__setattr__(self, "prompts", tuple(self.prompts))


@dataclass(frozen=True)
class BenchReport:
    package: str
    dtype: str
    size_bytes: int
    first_token_ms: float  # median over the prompts
    tokens_per_s: float  # median decode speed over the prompts
    peak_rss_bytes: int
    baseline_rss_bytes: int  # the interpreter with the runtime imported, before loading the package
    loaded_rss_bytes: int  # right after loading
    load_s: float
    context_filled: int
    config: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bench(package: Path | str, config: BenchConfig | None = None, timeout: float = 1800) -> BenchReport:
    """Measure ``package`` in a child process and return its report."""
    config = config or BenchConfig()
    cmd = [sys.executable, "-m", "edgepack.runtime.bench", CHILD_FLAG, str(package),
           json.dumps(dataclasses.asdict(config))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("edgepack: error: ")
        raise (UsageError if proc.returncode == 2 else EdgepackError)(f"bench of {package} failed: {tail}")
    return BenchReport(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _maxrss() -> int:
    """Peak resident bytes of this process. Linux: VmHWM, the high-water mark of this process's own
    memory map; ``ru_maxrss`` is not used there because it survives ``exec`` and so starts at the size
    of the (possibly large) parent that spawned the child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2 if s else 0.0


def _child(package: str, config: BenchConfig) -> dict[str, Any]:
    from edgepack.runtime.decoder import SessionSettings
    from edgepack.runtime.model import load
    from edgepack.runtime.package import read_manifest

    baseline = _maxrss()
    t0 = time.perf_counter()
    settings = SessionSettings(threads=config.threads)
    if config.low_memory:
        settings = dataclasses.replace(settings, cpu_arena=False, memory_pattern=False)
    settings = dataclasses.replace(settings, prepacking=config.prepacking, optimization=config.optimization)
    model = load(package, verify=False, settings=settings)
    load_s = time.perf_counter() - t0
    loaded = _maxrss()
    manifest = read_manifest(package)
    runs = []
    for prompt in config.prompts:
        ids = model.encode_prompt(prompt)
        cache = model.decoder.new_cache()
        if config.fill:
            _fill(model, cache, config, len(ids))
        result = _generate(model, list(cache.tokens) + ids, cache, config.max_new_tokens)
        runs.append({"prompt_tokens": len(ids), "new_tokens": len(result.tokens), "cache_tokens": cache.length,
                     "first_token_ms": round(result.first_token_s * 1000, 1),
                     "tokens_per_s": round(result.tokens_per_s, 2)})
    return dataclasses.asdict(BenchReport(
        package=package, dtype=manifest.dtype, size_bytes=manifest.total_size,
        first_token_ms=round(_median([r["first_token_ms"] for r in runs]), 1),
        tokens_per_s=round(_median([r["tokens_per_s"] for r in runs]), 2),
        peak_rss_bytes=_maxrss(), baseline_rss_bytes=baseline, loaded_rss_bytes=loaded, load_s=round(load_s, 2),
        context_filled=max(r["cache_tokens"] for r in runs), config=dataclasses.asdict(config), runs=runs,
    ))


def _fill(model, cache, config: BenchConfig, prompt_len: int) -> None:
    """Occupy the cache with ``fill`` positions of ordinary text, leaving room for prompt + answer."""
    room = model.generation.context_length - prompt_len - config.max_new_tokens - 1
    target = min(config.fill, room)
    if target <= 0:
        return
    from edgepack.runtime import text

    ids = model.tokenizer.encode(text.evaluation_text()[: target * 8])
    ids = (ids * (target // max(1, len(ids)) + 1))[:target]
    for i in range(0, target, config.chunk):
        model.decoder.forward(ids[i:i + config.chunk], cache)


def _generate(model, ids, cache, max_new_tokens: int):
    from edgepack.runtime.generation import GenerationResult

    result = GenerationResult()
    for _ in model.stream_ids(ids, max_new_tokens=max_new_tokens, cache=cache, result=result, ignore_eos=True):
        pass
    return result


def _child_main(argv: list[str]) -> int:
    package, raw = argv
    try:
        report = _child(package, BenchConfig(**json.loads(raw)))
    except EdgepackError as e:
        print(f"edgepack: error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(report))
    return 0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == CHILD_FLAG:
    sys.exit(_child_main(sys.argv[2:]))
