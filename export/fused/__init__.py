"""edgepack's own inference graph for the Llama family (``--graph fused``): see ``llama.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.export.fused.builder import save
from edgepack.export.fused.llama import GRAPH_NAME, build_llama, check_supported
from edgepack.runtime.manifest import MODEL_NAME

__all__ = ["GRAPH_NAME", "check_supported", "export", "weights_description"]


def export(model: Any, out_dir: Path, context: int, int4: bool = False, delta_slots: bool = False,
           int8: bool = False, factor_bits: int = 4) -> list[Path]:
    """Write the fused ``model.onnx`` for ``context`` positions into ``out_dir``; return the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return save(build_llama(model, context, int4, delta_slots=delta_slots, int8=int8, factor_bits=factor_bits),
                out_dir / MODEL_NAME)


def weights_description(int4: bool, int8: bool = False, factor_bits: int = 4) -> str:
    if int8 and not int4:
        return ("int8 (MatMulNBits, block 32, symmetric: Q8_0 form); tied embedding and LM head one 8-bit "
                "block-32 copy")
    if not int4:
        return "float32 (tied embedding stored once)"
    factors = "8-bit (symmetric, Q8_0 form)" if factor_bits == 8 else "4-bit with integer zero points"
    return ("int4 (MatMulNBits, block 32, Q4_1 form: integer codes and scales, float block minimum added "
            f"through block sums); ResSVD factors {factors}; tied embedding and LM head one 8-bit block-32 copy")
