"""``profile``: measure this host (cores, memory, ISA flags, memory bandwidth, execution providers,
matmul throughput for float32 / int8 / int4) and turn it into a ``DeviceProfile``.

Torch- and onnx-free: the int8 and int4 matmul graphs are written as ONNX protobuf bytes here (a few
dozen bytes of wire format), so this runs on a target that has only the runtime installed.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from edgepack.runtime.profiles import MB, DeviceProfile

_ISA_OF_INTEREST = ("neon", "asimd", "asimddp", "fphp", "asimdhp", "sve", "sve2", "i8mm", "bf16", "sse4_2", "avx",
                    "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class HostMeasurement:
    cores: int
    ram_mb: float
    available_mb: float
    cpu: str
    arch: str
    isa: tuple[str, ...]
    execution_providers: tuple[str, ...]
    bandwidth_gb_s: float  # a large array copy, read + write bytes per second
    matmul_gops: dict[str, float] = field(default_factory=dict)  # dtype → GOP/s (2·M·N·K per product)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def to_profile(self, name: str, share: float = 0.6) -> DeviceProfile:
        return DeviceProfile(
            name=name, description=f"{self.cpu} ({self.arch}), measured by edgepack profile", kind="host",
            ram_mb=round(self.ram_mb), app_memory_mb=round(self.ram_mb * share), storage_mb=_free_disk_mb(),
            cores=self.cores, cpu=self.cpu, arch=self.arch, isa=self.isa,
            execution_providers=self.execution_providers,
            sources=(f"edgepack profile on {platform.node()}: bandwidth {self.bandwidth_gb_s:.1f} GB/s, matmul GOP/s "
                     + ", ".join(f"{k} {v:.1f}" for k, v in self.matmul_gops.items()),),
        )


def measure(matmul: bool = True) -> HostMeasurement:
    ram, avail = _meminfo()
    return HostMeasurement(
        cores=os.cpu_count() or 1, ram_mb=ram, available_mb=avail, cpu=_cpu_name(), arch=platform.machine(),
        isa=_isa_flags(), execution_providers=tuple(ort.get_available_providers()),
        bandwidth_gb_s=round(bandwidth(), 2), matmul_gops=matmul_throughput() if matmul else {},
    )


def _meminfo() -> tuple[float, float]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total / MB, vm.available / MB
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages / MB, pages / MB


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(f for f in _ISA_OF_INTEREST if f in flags)
    except OSError:
        pass
    return ()


def _free_disk_mb() -> float:
    import shutil

    return round(shutil.disk_usage(os.getcwd()).free / MB)


def bandwidth(size_mb: int = 256, repeats: int = 3) -> float:
    """GB/s of a copy between two large buffers (bytes read + written)."""
    a = np.ones(size_mb * MB // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def matmul_throughput(m: int = 64, k: int = 1024, n: int = 1024, seconds: float = 0.5) -> dict[str, float]:
    """GOP/s of an M×K by K×N product in onnxruntime: float32 MatMul, int8 MatMulInteger, int4 MatMulNBits."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    out = {}
    for name, model, feed in (
        ("float32", _matmul_f32(k, n), {"A": a}),
        ("int8", _matmul_int8(k, n), {"A": rng.integers(0, 255, (m, k), dtype=np.uint8)}),
        ("int4", _matmul_nbits(k, n), {"A": a}),
    ):
        try:
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        except Exception:  # an onnxruntime build without the kernel: report none rather than fail
            continue
        sess.run(None, feed)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            sess.run(None, feed)
            runs += 1
        out[name] = round(2 * m * n * k * runs / (time.perf_counter() - start) / 1e9, 1)
    return out


# --- a minimal ONNX protobuf writer (wire format; field numbers from onnx.proto) ---

def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(number: int, value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, dtype: int, dims: tuple[int, ...], raw: bytes) -> bytes:
    return b"".join(_field(1, d) for d in dims) + _field(2, dtype) + _field(8, name) + _field(9, raw)


def _value(name: str, dtype: int, dims: tuple[int | str, ...]) -> bytes:
    shape = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims)
    return _field(1, name) + _field(2, _field(1, _field(1, dtype) + _field(2, shape)))


def _node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **ints: int) -> bytes:
    attrs = b"".join(_field(5, _field(1, k) + _field(3, v) + _field(20, 2)) for k, v in ints.items())
    return (b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in outputs) + _field(3, op)
            + _field(4, op) + attrs + (_field(7, domain) if domain else b""))


def _model(node: bytes, inits: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    graph = (_field(1, node) + _field(2, "bench") + b"".join(_field(5, t) for t in inits)
             + b"".join(_field(11, i) for i in inputs) + b"".join(_field(12, o) for o in outputs))
    opsets = _field(8, _field(1, "") + _field(2, 17)) + _field(8, _field(1, "com.microsoft") + _field(2, 1))
    return _field(1, 8) + opsets + _field(7, graph)


def _matmul_f32(k: int, n: int) -> bytes:
    w = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    return _model(_node("MatMul", ["A", "B"], ["Y"]), [_tensor("B", 1, (k, n), w.tobytes())],
                  [_value("A", 1, ("M", k))], [_value("Y", 1, ("M", n))])


def _matmul_int8(k: int, n: int) -> bytes:
    w = np.random.default_rng(1).integers(-127, 127, (k, n), dtype=np.int8)
    return _model(_node("MatMulInteger", ["A", "B"], ["Y"]), [_tensor("B", 3, (k, n), w.tobytes())],
                  [_value("A", 2, ("M", k))], [_value("Y", 6, ("M", n))])


def _matmul_nbits(k: int, n: int, block: int = 32) -> bytes:
    rng = np.random.default_rng(1)
    packed = rng.integers(0, 255, (n, k // block, block // 2), dtype=np.uint8)
    scales = (rng.random(n * k // block, dtype=np.float32) * 0.01).astype(np.float32)
    inits = [_tensor("B", 2, packed.shape, packed.tobytes()), _tensor("S", 1, scales.shape, scales.tobytes())]
    node = _node("MatMulNBits", ["A", "B", "S"], ["Y"], "com.microsoft", K=k, N=n, bits=4, block_size=block,
                 accuracy_level=4)
    return _model(node, inits, [_value("A", 1, ("M", k))], [_value("Y", 1, ("M", n))])

