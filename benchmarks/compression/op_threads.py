"""Per-op cost of onnxruntime's int4 MatMulNBits at one token (M = 1), one and two threads, by shape.

    python benchmarks/compression/op_threads.py [--shapes 576x1536 576x144 ...] [--megabytes 40]

Each shape is timed as a graph of L copies of the op with distinct random weights (L chosen so the
weights total ``--megabytes``, more than the last-level cache: decoding reads weights from memory),
all reading one input; L is at most ``MAX_COPIES``, so only ops under 20 kB total less. The per-op time
is the median graph time over L. Shapes default to a dense layer's ops and a factorized layer's (the
default model's ResSVD factors at 20 %: ranks 144 / 72 for q, o / k, v and 209 for gate, up, down), and
each layer's ops are summed. #4: why a factorized layer gains less from the second thread than a dense one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DENSE = ["576x960", "576x576", "576x3072", "1536x576"]
MAX_COPIES = 2000  # tiny shapes would otherwise make graphs of 10^5 nodes
FACTORS = ["576x288", "288x960", "576x144", "144x576", "576x418", "209x1536", "209x1536", "1536x209", "209x576"]


def _op(name: str, k: int, n: int, rng: np.random.Generator, inits: list, level: int = 4) -> helper.NodeProto:
    blocks = -(-k // 32)
    inits += [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, 16), dtype=np.uint8), f"{name}_q"),
              numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) * 0.01), f"{name}_s"),
              numpy_helper.from_array(rng.integers(0, 255, (n * ((blocks + 1) // 2),), dtype=np.uint8), f"{name}_z")]
    return helper.make_node("MatMulNBits", ["x", f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_y"],
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=level)


def graph(copies: int, k: int, n: int, level: int = 4) -> bytes:
    rng, inits = np.random.default_rng(0), []
    nodes = [_op(f"o{i}", k, n, rng, inits, level) for i in range(copies)]
    outs = [helper.make_tensor_value_info(f"o{i}_y", TensorProto.FLOAT, [1, n]) for i in range(copies)]
    g = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets).SerializeToString()


def per_op_us(model: bytes, k: int, copies: int, threads: int, reps: int = 200) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    x = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    for _ in range(20):
        session.run(None, x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6 / copies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=DENSE + FACTORS, help="KxN of each op")
    p.add_argument("--megabytes", type=float, default=40.0, help="int4 weight bytes of each timed graph")
    p.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits accuracy_level (4, as exported: int8 compute; 1: float32)")
    args = p.parse_args()
    print("| K x N | kB | 1 thread (us) | 2 threads (us) | speed-up |\n|---|---|---|---|---|")
    timed: dict[str, tuple[float, float]] = {}
    for shape in dict.fromkeys(args.shapes):
        k, n = map(int, shape.split("x"))
        kb = k * n * 0.53 / 1e3  # 4-bit codes + a float scale and a 4-bit zero point per 32
        copies = min(MAX_COPIES, max(8, int(args.megabytes * 1e3 / kb)))
        model = graph(copies, k, n, args.accuracy_level)
        timed[shape] = t1, t2 = per_op_us(model, k, copies, 1), per_op_us(model, k, copies, 2)
        print(f"| {k} x {n} | {kb:.0f} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f} |", flush=True)
    for name, layer in (("dense layer", DENSE), ("factorized layer", FACTORS)):
        if all(shape in timed for shape in layer):
            t1, t2 = (sum(timed[shape][i] for shape in layer) for i in (0, 1))
            print(f"\n{name}, {len(layer)} ops: 1 thread {t1:.0f} us, 2 threads {t2:.0f} us ({t1 / t2:.2f}x)")


if __name__ == "__main__":
    main()
