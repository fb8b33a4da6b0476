"""A small GGUF of another quantization type, made offline from the default model's Q4_1 GGUF:
the first ``--layers`` blocks only, every tensor dequantized and re-quantized to ``--type``
(F32, F16, Q8_0, ...). Checks that ``edgepack build some.gguf`` is not tied to Q4_1.

    python benchmarks/generality/gguf_variant.py --type Q8_0 --layers 2 -o /tmp/smol-q8.gguf
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np


def write_variant(src: Path, dst: Path, qtype: str, layers: int) -> Path:
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    target = gguf.GGMLQuantizationType[qtype]
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        block = re.match(r"blk\.(\d+)\.", t.name)
        if block and int(block.group(1)) >= layers:
            continue
        values = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # 1-D tensors (norms) stay float32, as converters do.
        kind = target if values.ndim > 1 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            data = values
        elif kind == gguf.GGMLQuantizationType.F16:
            data = values.astype(np.float16)
        else:
            data = quants.quantize(values, kind)
        writer.add_tensor(t.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main() -> None:
    from edgepack.toolchain.default_model import ensure_default_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    print(write_variant(ensure_default_model(), Path(args.output), args.type, args.layers))


if __name__ == "__main__":
    main()
