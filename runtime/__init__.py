"""edgepack's runtime: load a package and generate text on onnxruntime alone (no torch)."""

from edgepack.runtime.decoder import SessionSettings
from edgepack.runtime.errors import EdgepackError, IntegrityError, PackageError, UsageError
from edgepack.runtime.generation import GenerationResult
from edgepack.runtime.model import Model, Session, apply_delta, generate, load
from edgepack.runtime.package import open_package
from edgepack.runtime.sampling import SamplingConfig

__all__ = [
    "EdgepackError",
    "GenerationResult",
    "IntegrityError",
    "Model",
    "PackageError",
    "SamplingConfig",
    "Session",
    "SessionSettings",
    "UsageError",
    "apply_delta",
    "generate",
    "load",
    "open_package",
]
