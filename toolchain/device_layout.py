"""Package layouts for small devices: every weight int4, kept as external data, and the .ort format.

The plain int4 build (``export/quantize.py``) quantizes the decoder's MatMuls but leaves the tied
embedding float32: the exporter feeds the LM head from ``Transpose(embedding)``, which the quantizer
cannot touch and onnxruntime constant-folds at load into a *second* float32 copy. For the default
model that is 2 × 113 MB of the ~600 MB peak. ``quantize_all_int4`` first materializes the LM head as
its own (transposed) initializer, then quantizes the MatMuls (MatMulNBits) *and* the embedding Gather
(GatherBlockQuantized), block 32, asymmetric, so no float32 vocabulary matrix remains, and writes the
weights as external data (``model.onnx.data``), which onnxruntime maps instead of parsing into its heap.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from edgepack.runtime.errors import EdgepackError

DATA_SUFFIX = ".data"
ORT_NAME = "model.ort"
ORT_CONFIG_NAME = "required_operators.config"


def untie_lm_head(model) -> int:
    """Replace ``Transpose(initializer)`` nodes by a transposed initializer; return how many."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or len(node.input) != 1 or node.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        array = numpy_helper.to_array(inits[node.input[0]])
        transposed = np.ascontiguousarray(np.transpose(array, perm[0] if perm else None))
        model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    return folded


def quantize_all_int4(src: Path, dst: Path, block_size: int = 32) -> None:
    """Int4 for every MatMul with a constant weight and for the embedding Gather; external data."""
    import onnx
    from edgepack.export.gemm import gemms_to_matmuls
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = onnx.load(str(src))
    gemms_to_matmuls(model)  # GPT-2-style projections are Gemm, which the quantizer skips
    untie_lm_head(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    save_external(quantizer.model.model, dst)


def save_external(model, dst: Path) -> None:
    """Save with every tensor over 1 KB in ``<dst>.data`` (a fresh file)."""
    import onnx

    data = dst.with_name(dst.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def write_ort_format(folder: Path, model_name: str = "model.onnx") -> list[str]:
    """Convert ``folder/model_name`` with onnxruntime's converter; keep the .ort model and the reduced
    operator config (for a minimal mobile build of onnxruntime). Returns the file names added."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".edgepack-ort-", dir=folder.parent) as tmp:
        work = Path(tmp)
        src = work / model_name
        src.symlink_to((folder / model_name).resolve())
        data = folder / (model_name + DATA_SUFFIX)
        if data.exists():
            (work / data.name).symlink_to(data.resolve())
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
               "--output_dir", str(work / "out"), "--optimization_style", "Fixed"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = work / "out"
        orts = sorted(out.rglob("*.ort")) if out.is_dir() else []
        if proc.returncode != 0 or not orts:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise EdgepackError(f"onnxruntime's .ort converter failed: {tail}")
        orts[0].replace(folder / ORT_NAME)
        configs = sorted(out.rglob("*.config"))
        names = [ORT_NAME]
        if configs:
            configs[0].replace(folder / ORT_CONFIG_NAME)
            names.append(ORT_CONFIG_NAME)
    return names
