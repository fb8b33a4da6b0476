"""One peer in its own process, so its peak RSS is its own: loads one system, then answers timing requests.

    python benchmarks/peers/worker.py KIND PATH --threads N --context N

KIND: torch (PATH unused: the default model), optimum (PATH: a folder with model.onnx + config.json),
edgepack (PATH: a package), llama-cpp (PATH: a .gguf). The coordinator (run.py) writes one JSON line
per request on stdin, ``{"prompt": [ids], "new_tokens": N}``, and reads ``{"seconds": t}`` back; the
time is measured here, around generation alone. ``{"rss": true}`` answers the process's peak RSS.
Every system generates exactly N tokens greedily from the same token ids (end-of-sequence ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

Runner = Callable[[list[int], int], None]


def torch_runner(_: Path, threads: int, context: int) -> Runner:
    import torch
    from edgepack.toolchain import sources

    torch.set_num_threads(threads)
    model = sources.load("default").model

    def run(prompt: list[int], n: int) -> None:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=model.config.pad_token_id)

    return run


def optimum_runner(folder: Path, threads: int, context: int) -> Runner:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False,
                                                session_options=options)

    def run(prompt: list[int], n: int) -> None:
        ids = torch.tensor([prompt])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=model.config.pad_token_id)

    return run


def edgepack_runner(package: Path, threads: int, context: int) -> Runner:
    from edgepack.runtime import load
    from edgepack.runtime.decoder import SessionSettings

    model = load(package, settings=SessionSettings(threads=threads))

    def run(prompt: list[int], n: int) -> None:
        for _ in model.stream_ids(prompt, max_new_tokens=n, ignore_eos=True):
            pass

    return run


def llama_cpp_runner(gguf: Path, threads: int, context: int) -> Runner:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)

    def run(prompt: list[int], n: int) -> None:
        llm.reset()  # no prompt reuse between requests: every run prefills, as the other systems do
        tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        for i, _ in enumerate(tokens, 1):  # end-of-sequence is just another token here
            if i >= n:
                break

    return run


RUNNERS: dict[str, Callable[[Path, int, int], Runner]] = {
    "torch": torch_runner, "optimum": optimum_runner, "edgepack": edgepack_runner, "llama-cpp": llama_cpp_runner,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(RUNNERS))
    parser.add_argument("path", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args()
    from edgepack.runtime.bench import _maxrss  # VmHWM on Linux: this process's own peak

    start = time.perf_counter()
    run = RUNNERS[args.kind](args.path, args.threads, args.context)
    reply = {"ready": True, "load_s": time.perf_counter() - start, "rss": _maxrss()}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("rss"):
            print(json.dumps({"rss": _maxrss()}), flush=True)
            continue
        t0 = time.perf_counter()
        run(request["prompt"], request["new_tokens"])
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
