"""Typed errors for all of edgepack; the CLI maps them to a one-line message and an exit code.

They live in the runtime because it is the layer every other one depends on (and it is torch-free).
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base of every error edgepack raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(EdgepackError):
    """Bad arguments or bad input from the user."""

    exit_code = 2


class ModelSourceError(UsageError):
    """A model path, name or file that cannot be loaded."""


class UnsupportedArchitecture(UsageError):
    """A model whose architecture a step of edgepack cannot handle yet."""


class PackageError(UsageError):
    """A package that is missing, malformed, of an unknown format, or fails its checksums."""


class IntegrityError(PackageError):
    """A file of a package whose size or sha256 differs from its manifest."""


class ResourceError(UsageError):
    """Not enough memory or disk for what was asked; the message gives the figures and the way out."""


class MissingExtraError(UsageError):
    """A command that needs an optional dependency group which is not installed."""


class ParityError(EdgepackError):
    """The exported model's logits differ from PyTorch's beyond the tolerance."""
