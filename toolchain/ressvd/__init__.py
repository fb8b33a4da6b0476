"""ResSVD: calibration-whitened truncated SVD with a residual stage, on the last k decoder layers."""

from edgepack.toolchain.ressvd.compress import CompressionReport, compress_
from edgepack.toolchain.ressvd.config import METHODS, ResSVDConfig

__all__ = ["METHODS", "CompressionReport", "ResSVDConfig", "compress_"]
