"""Build an int4 ResSVD package that factorizes only some projections of the last K layers (#4).

    python benchmarks/compression/targets_build.py default -o DIR --layers 16 --rank 209 \
        --targets gate_proj up_proj down_proj

The default (``edgepack build --ratio``) factorizes all seven projections of the last layers. Measured
per op (op_threads.py), a factorized attention block is no faster than a dense one: its four small
MatMulNBits each pay the fixed per-node cost. This build keeps attention dense and spends the whole
parameter budget on the MLP, through ResSVD's explicit rank map (the planner's path), with everything
else as in the default build (propagation, the int4-aware tune, the fused graph).
"""

from __future__ import annotations

import argparse
import sys


def rank_map(model_spec: str, layers: int, rank: int, targets: list[str]) -> dict[str, int]:
    """{module name: rank} for ``targets`` (name suffixes) in the last ``layers`` decoder layers."""
    from edgepack.toolchain import sources
    from edgepack.toolchain.ressvd.selection import target_linears

    model = sources.load(model_spec).model
    per_layer = target_linears(model, targets)
    if layers > len(per_layer):
        sys.exit(f"targets_build: --layers {layers} is more than the model's {len(per_layer)} layers")
    return {name: rank for layer in per_layer[len(per_layer) - layers:] for name, _ in layer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layers", type=int, required=True, help="the last K decoder layers")
    p.add_argument("--rank", type=int, required=True, help="rank of every factorized projection")
    p.add_argument("--targets", nargs="+", default=["gate_proj", "up_proj", "down_proj"])
    args = p.parse_args()

    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.ressvd import ResSVDConfig

    ranks = rank_map(args.model, args.layers, args.rank, args.targets)
    manifest = build(BuildConfig(model=args.model, int4=True, compression=ResSVDConfig(rank_map=ranks)), args.output)
    print(f"{args.output}: {len(ranks)} projections at rank {args.rank}, {manifest.total_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
