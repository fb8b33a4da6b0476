"""Runtime subcommands: ``run``, ``chat``, ``inspect`` and ``eval`` (``profile`` and ``bench`` in
``device_commands``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepack.runtime.decoder import SessionSettings
from edgepack.runtime.errors import UsageError
from edgepack.runtime.generation import GenerationResult
from edgepack.runtime.model import Model, load
from edgepack.runtime.package import open_package, read_manifest
from edgepack.runtime.sampling import SamplingConfig

EVAL_CONTEXT = 512  # the evaluation windows the benchmarks and issue targets use


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate an answer to one prompt", description="Generate an answer "
                       "to one prompt with a package, streaming it to standard output.")
    p.add_argument("package", help="package folder or .edgepack archive")
    p.add_argument("prompt", help="the prompt (sent through the chat template when the package has one)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    _generation_args(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speed to standard error")
    p.set_defaults(handler=run)

    p = sub.add_parser("chat", help="chat with a package interactively", description="Interactive, "
                       "streaming chat. The KV cache is kept between turns. Type /reset to start over, "
                       "/exit (or end of input) to leave.")
    p.add_argument("package", help="package folder or .edgepack archive")
    p.add_argument("--system", help="a system message for the conversation")
    _generation_args(p)
    p.set_defaults(handler=chat)

    p = sub.add_parser("inspect", help="describe a package or a delta file", description="Print a "
                       "package's manifest summary (--verify also checks every file's sha256), or what a "
                       "fine-tune delta file holds.")
    p.add_argument("package", help="package folder, .edgepack archive, or delta .safetensors file")
    p.add_argument("--verify", action="store_true", help="check every file's size and sha256")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(handler=inspect)

    p = sub.add_parser("pack", help="write a package folder as one .edgepack file",
                       description="Verify a package folder and write it as a single uncompressed zip that "
                       "run, chat, inspect, eval and load() accept wherever they accept a folder (unpacked "
                       "safely into $EDGEPACK_CACHE/packages on first use).")
    p.add_argument("package", help="package folder")
    p.add_argument("-o", "--output", required=True, help="archive file to write, e.g. model.edgepack")
    p.set_defaults(handler=pack)

    p = sub.add_parser("eval", help="perplexity of a package (runtime) or a model (PyTorch) on text",
                       description="Perplexity on the held-out evaluation split of pydoc_data.topics, or on "
                       "--text. A package is scored in the runtime (no torch), so the figure is what ships; "
                       "a model source ('default', folder, .gguf) is scored in PyTorch (toolchain extra).")
    p.add_argument("target", help="package folder or .edgepack archive, or 'default' / model folder / .gguf")
    p.add_argument("--text", help="a UTF-8 text file, or a folder of text files (.txt, .md, .py, ...); "
                   "default: the evaluation split")
    p.add_argument("--context", type=int, default=None,
                   help=f"window length in tokens (default {EVAL_CONTEXT}, or a package's context if shorter)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = its default)")
    p.add_argument("--delta", help="package only: apply this fine-tune delta file first")
    p.add_argument("--no-memory-check", action="store_true",
                   help="load even when the package's predicted peak memory exceeds the available memory")
    p.set_defaults(handler=evaluate)

    from edgepack.runtime import device_commands

    device_commands.register(sub)


def _generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = its default)")
    g.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the package files")
    g.add_argument("--no-memory-check", action="store_true",
                   help="load even when the package's predicted peak memory exceeds the available memory")
    g.add_argument("--delta", help="apply this fine-tune delta file (made by 'edgepack delta') at load time")


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _load(args: argparse.Namespace) -> Model:
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    return load(args.package, verify=not args.no_verify, settings=SessionSettings(threads=args.threads),
                delta=args.delta, check_memory=not args.no_memory_check)


def run(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model = _load(args)
    result = GenerationResult()
    for piece in model.stream(args.prompt, max_new_tokens=args.max_tokens, sampling=sampling, stop=args.stop,
                              chat=False if args.raw else None, result=result):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{result.prompt_tokens} prompt tokens, {len(result.tokens)} new tokens, "
              f"first token {result.first_token_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model = _load(args)
    session = model.session(system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("edgepack chat: /reset to start over, /exit to leave.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            for piece in session.send(text, max_new_tokens=args.max_tokens, sampling=sampling, stop=args.stop):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except UsageError as e:  # e.g. the history outgrew the context: say so and go on
            print(f"\nedgepack: {e}; type /reset to start a new conversation", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _describe_compression(report: dict | None) -> str:
    if not report:
        return "none"
    return (f"{report['config']['method']}, last {report['layers_compressed']} layers factorized, "
            f"{report['removed_share']:.1%} of decoder linear parameters removed")


def inspect(args: argparse.Namespace) -> int:
    if Path(args.package).is_file() and Path(args.package).suffix == ".safetensors":
        return _inspect_delta(args)
    if Path(args.package).is_file() and Path(args.package).suffix != ".edgepack":
        raise UsageError(f"{args.package} is not a package: inspect describes a package folder, a .edgepack archive "
                         "or a delta (.safetensors)")
    manifest = read_manifest(args.package)
    if args.verify:
        open_package(args.package, verify=True)  # a folder is hashed in place, an archive as it unpacks
    if args.json:
        print(manifest.to_json(), end="")
        return 0
    model = manifest.model
    print(f"package      {args.package}  (format v{manifest.format_version})")
    print(f"model        {model.get('architecture')} ({model.get('model_type')}), "
          f"{model.get('parameters', 0) / 1e6:.1f}M parameters, {model.get('layers')} layers")
    print(f"source       {model.get('source', {}).get('ref')}")
    print(f"weights      {manifest.plan.get('weights', manifest.dtype)}")
    print(f"compression  {_describe_compression(manifest.plan.get('compression'))}")
    print(f"context      {manifest.plan.get('context_length')} tokens")
    slots = (manifest.plan.get("config") or {}).get("delta_slots")
    print(f"deltas       {'accepted (--delta FILE)' if slots else 'no delta slots'}; weights fingerprint "
          f"{model.get('weights_fingerprint', 'not recorded')}")
    print(f"size         {manifest.total_size / 1e6:.1f} MB in {len(manifest.files)} files")
    for name, report in manifest.parity.items():
        print(f"parity       {name}: max |Δlogit| {report['max_abs_diff']:.3g} "
              f"(tolerance {report['tolerance']:.3g}), top-1 agreement {report['top1_agreement']:.1%}")
    if manifest.build:
        print(f"built in     {manifest.build.get('seconds')} s with edgepack {manifest.build.get('edgepack')}")
    if args.verify:
        print("verified     every file matches its sha256")
    return 0


def _inspect_delta(args: argparse.Namespace) -> int:
    import json

    from edgepack.runtime import delta_file

    _, meta = delta_file.read_with_metadata(args.package)  # small: always verify the tensors against the metadata
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    info = delta_file.summary(meta)
    size = Path(args.package).stat().st_size
    print(f"delta        {args.package}  (format v{info['format_version']}), {size / 1e3:.1f} kB on disk")
    print(f"method       {info['method']}, rank r={info['rank']}, relax c={info['relax']}, "
          f"values {info['value_dtype']}")
    print(f"importance   {info['importance']}")
    print(f"layers       {info['layers']} linear layers, mean density {info['mean_density']:.1%} of the rank-(r+c) "
          f"factors; {info['accounted_bits'] / 8e3:.1f} kB accounted (32-bit values + indices)")
    print(f"dense        {', '.join(info['dense_parameters']) or 'none'}")
    print(f"base         weights fingerprint {info['base_fingerprint']}")
    if args.verify:
        print("verified     tensor checksum and shapes match the metadata")
    return 0


def pack(args: argparse.Namespace) -> int:
    from edgepack.runtime.archive import pack as write_archive

    out = write_archive(args.package, args.output)
    print(f"packed {args.package} -> {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _window_length(requested: int | None, package_context: int) -> int:
    """The eval window: as asked (at most the package's context), or the default capped by it."""
    if requested is None:
        return min(EVAL_CONTEXT, package_context)
    if requested > package_context:
        raise UsageError(f"--context {requested} is longer than this package's context of {package_context} "
                         f"tokens; pass --context {package_context} or less")
    return requested


def evaluate(args: argparse.Namespace) -> int:
    from edgepack.runtime import text as texts
    from edgepack.runtime.manifest import MANIFEST_NAME
    from edgepack.runtime.perplexity import perplexity, windows

    corpus = texts.read_text(args.text) if args.text else texts.evaluation_text()
    target = Path(args.target)
    # The bar opens at the first scored window, not before the load: a bad model then fails without one.
    bar = _LazyBar(desc="eval", unit="window", file=sys.stderr)
    try:
        if (target / MANIFEST_NAME).is_file() or target.is_file() and target.suffix == ".edgepack":
            model = load(target, settings=SessionSettings(threads=args.threads), delta=args.delta,
                         check_memory=not args.no_memory_check)
            ids = model.tokenizer.encode(corpus, add_special_tokens=False)
            dec = model.decoder
            # The manifest's context, not the decoder's: optimum's graph has no limit of its own to report.
            context = _window_length(args.context, model.generation.context_length)
            bar.total = len(windows(ids, context, args.max_windows))
            result = perplexity(lambda w: dec.forward(w, dec.new_cache(), all_logits=True), ids, context,
                                args.max_windows, bar.update)
        else:
            from edgepack.toolchain.cli import require_toolchain

            if not target.exists() and args.target != "default":
                raise UsageError(f"not found: {args.target} (pass a package, 'default', a Hugging Face model folder "
                                 "or a .gguf file)")
            if args.delta:
                raise UsageError("--delta applies to packages; for a model source, merge the fine-tune instead")
            require_toolchain()
            from edgepack.toolchain.evaluate import evaluate_model

            result = evaluate_model(args.target, corpus, args.context, args.max_windows, bar.update, EVAL_CONTEXT)
    finally:
        bar.close()
    print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens "
          f"({result.windows} window{'s' if result.windows != 1 else ''} of {result.context})")
    return 0


class _LazyBar:
    """A tqdm bar made on the first ``update``; ``total`` may be set before that."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.total, self._bar = kwargs, None, None

    def update(self, n: int = 1) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, **self.kwargs)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
