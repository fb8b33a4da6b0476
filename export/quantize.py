"""Weight-only int4 (or int8) quantization with onnxruntime's MatMulNBits quantizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Int4Config:
    """Block-32 asymmetric int4, like the Q4_1 GGUF the default model ships as, so re-quantizing it
    loses little; accuracy_level 4 lets the CPU kernel compute in int8 (the fast path)."""

    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    bits: int = 4  # 8: int8 MatMulNBits (``edgepack build --int8`` on optimum's graph)


def quantize_int4(src: Path, dst: Path, config: Int4Config | None = None) -> None:
    """Quantize every MatMul with a constant weight in ``src`` to MatMulNBits, writing ``dst``."""
    import onnx
    from edgepack.export.gemm import gemms_to_matmuls
    from edgepack.runtime.errors import UnsupportedArchitecture
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    cfg = config or Int4Config()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    gemms_to_matmuls(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=cfg.bits, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
        accuracy_level=cfg.accuracy_level,
    )
    quantizer.process()
    out = quantizer.model.model
    if not any(node.op_type == "MatMulNBits" for node in out.graph.node):
        # Otherwise the package would be float32 under an int4 / int8 label.
        raise UnsupportedArchitecture(f"no linear layer of this model's graph could be quantized to {cfg.bits} bits "
                                      "(no MatMul with a constant weight); build it without --int4 / --int8")
    large = out.ByteSize() > (1 << 31) - (1 << 26)  # protobuf's 2 GB limit, with headroom
    onnx.save_model(out, str(dst), save_as_external_data=large,
                    location=dst.name + ".data" if large else None)
