"""How much of a token's decode time ResSVD can remove: the compressed layers' linear ops alone, dense
against factorized, next to the whole packages (an Amdahl's-law account of the decode speed-up).

    python benchmarks/compression/decode_share.py COMPRESSED_FOLDER DENSE_PKG RESSVD_PKG [--threads 1] [--rounds 60]

COMPRESSED_FOLDER is what ``edgepack compress default --ratio 0.2 -o DIR`` writes (its dense source is
loaded too); the packages are the int4 fused builds of the dense model and of that folder. For the layers
the folder factorizes, two graphs hold only their linear ops, chained as in a decoder layer (packed q/k/v,
o, gate/up + SiLU, down, the two residual adds), once with the dense weights and once with the factor pairs,
laid out as the fused exporter lays them out (``LinearEmitter``, int4, exact Q4_1 form for dense weights,
block-diagonal q/k/v factors). Their calls and the packages' decode steps alternate in one process, so
load changes hit all of them alike. The report: the linears' speed-up against their byte ratio, their share
of the dense package's step, and the whole-package speed-up that share allows when everything else is
unchanged (T_dense / (T_dense − saved)), against the measured one and the packages' byte ratio. Never
asserts anything about time. Use one thread: with more, the four sessions' idle pools spin on the same cores
and every figure is distorted (2 threads on 2 cores, quiet: the dense step no faster than with one); the peers
benchmark (one system a process) measures multi-threaded decode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepack.export.fused.builder import FLOAT, GraphBuilder
from edgepack.export.fused.linear import LinearEmitter, is_factorized
from edgepack.runtime.decoder import SessionSettings
from edgepack.runtime.model import load as load_package
from edgepack.toolchain import sources

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _array(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def linear_graph(layers: list, hidden: int):
    """The linear ops of ``layers`` chained: x + o(qkv(x)[:hidden]), then + down(silu(gate) * up)."""
    b = GraphBuilder("linears")
    x = b.add_input("x", FLOAT, [1, 1, hidden])
    lin = LinearEmitter(b, int4=True)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        if all(is_factorized(p) for p in projections):
            qkv = lin.joint(x, projections, f"{i}.qkv")
        else:
            qkv = lin.weight(x, np.concatenate([_array(p.weight) for p in projections]), None, f"{i}.qkv")
        att = b.op1("Slice", [qkv, b.const([0]), b.const([hidden]), b.const([2])], f"{i}/heads")
        x = b.op1("Add", [x, lin.module(att, attn.o_proj, f"{i}.o")], f"{i}/residual_attn")
        if is_factorized(mlp.gate_proj):
            gate, up = lin.modules(x, [mlp.gate_proj, mlp.up_proj], [f"{i}.gate", f"{i}.up"], f"{i}.gate_up_low")
        else:
            both = lin.weight(x, np.concatenate([_array(mlp.gate_proj.weight), _array(mlp.up_proj.weight)]), None,
                              f"{i}.gate_up")
            width = mlp.gate_proj.out_features
            gate, up = b.op("Split", [both, b.const([width, width])], f"{i}/split", 2, axis=-1)
        silu = b.op1("Mul", [gate, b.op1("Sigmoid", [gate], f"{i}/sigmoid")], f"{i}/silu")
        gated = b.op1("Mul", [silu, up], f"{i}/gated")
        x = b.op1("Add", [x, lin.module(gated, mlp.down_proj, f"{i}.down")], f"{i}/residual_mlp")
    b.add_output(x, "y", FLOAT, [1, 1, hidden])
    return b.to_model()


def weight_bytes(model) -> int:
    return sum(int(np.prod(t.dims)) * (1 if t.data_type == 2 else 4) for t in model.graph.initializer)


def package_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compressed", type=Path)
    p.add_argument("dense_package", type=Path)
    p.add_argument("ressvd_package", type=Path)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of every session (keep 1: see above)")
    p.add_argument("--rounds", type=int, default=60, help="rounds of 10 linear calls and 10 decode steps each")
    args = p.parse_args()
    compressed = sources.load(str(args.compressed)).model
    dense = sources.load("default").model
    hidden = dense.config.hidden_size
    index = [i for i, layer in enumerate(compressed.model.layers)
             if any(is_factorized(m) for m in layer.modules())]
    graphs = {"dense": linear_graph([dense.model.layers[i] for i in index], hidden),
              "factors": linear_graph([compressed.model.layers[i] for i in index], hidden)}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    sessions = {k: ort.InferenceSession(g.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for k, g in graphs.items()}
    settings = SessionSettings(threads=args.threads)
    packages = {"dense": load_package(args.dense_package, verify=False, settings=settings),
                "factors": load_package(args.ressvd_package, verify=False, settings=settings)}
    x = np.random.default_rng(0).standard_normal((1, 1, hidden)).astype(np.float32)
    caches = {k: m.decoder.new_cache() for k, m in packages.items()}
    ids = packages["dense"].encode_prompt(PROMPT)
    nxt = {k: int(m.decoder.forward(ids, caches[k]).argmax()) for k, m in packages.items()}
    linear_t: dict[str, list[float]] = {k: [] for k in graphs}
    step_t: dict[str, list[float]] = {k: [] for k in graphs}
    for rnd in range(args.rounds):
        if caches["dense"].length + 10 >= packages["dense"].decoder.context_length // 2:  # bounded attention cost
            caches = {k: m.decoder.new_cache() for k, m in packages.items()}
            nxt = {k: int(m.decoder.forward(ids, caches[k]).argmax()) for k, m in packages.items()}
        for k in (["dense", "factors"] if rnd % 2 else ["factors", "dense"]):
            t0 = time.perf_counter()
            for _ in range(10):
                sessions[k].run(None, {"x": x})
            linear_t[k].append((time.perf_counter() - t0) / 10)
            t0 = time.perf_counter()
            for _ in range(10):
                nxt[k] = int(packages[k].decoder.forward([nxt[k]], caches[k]).argmax())
            step_t[k].append((time.perf_counter() - t0) / 10)
    lin = {k: statistics.median(v) for k, v in linear_t.items()}
    step = {k: statistics.median(v) for k, v in step_t.items()}
    saved = lin["dense"] - lin["factors"]
    wb = {k: weight_bytes(g) for k, g in graphs.items()}
    pb = {"dense": package_bytes(args.dense_package), "factors": package_bytes(args.ressvd_package)}
    print(f"{len(index)} compressed layers ({index[0]}-{index[-1]}), {args.threads} thread(s), "
          f"medians of {args.rounds} rounds")
    print("| part | dense | ResSVD | bytes ratio | speed-up |\n|---|---|---|---|---|")
    print(f"| linear ops of the compressed layers | {lin['dense'] * 1e3:.3f} ms, {wb['dense'] / 1e6:.1f} MB | "
          f"{lin['factors'] * 1e3:.3f} ms, {wb['factors'] / 1e6:.1f} MB | {wb['dense'] / wb['factors']:.3f} | "
          f"{lin['dense'] / lin['factors']:.3f} |")
    print(f"| whole package, one decode step | {step['dense'] * 1e3:.3f} ms, {pb['dense'] / 1e6:.1f} MB | "
          f"{step['factors'] * 1e3:.3f} ms, {pb['factors'] / 1e6:.1f} MB | {pb['dense'] / pb['factors']:.3f} | "
          f"{step['dense'] / step['factors']:.3f} |")
    print(f"share of the dense step in those linears: {lin['dense'] / step['dense']:.1%}; "
          f"speed-up they allow (rest unchanged): {step['dense'] / (step['dense'] - saved):.3f}")


if __name__ == "__main__":
    main()
