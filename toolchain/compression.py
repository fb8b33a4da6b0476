"""``compress``: model source → calibration → ResSVD → a compressed model folder (or, inline, a
compressed model in memory for ``build``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgepack.runtime import text as texts
from edgepack.toolchain import conv1d, sources
from edgepack.toolchain.ressvd import CompressionReport, ResSVDConfig, compress_
from edgepack.toolchain.ressvd.calibration import calibration_windows


def compress_loaded(loaded: sources.LoadedModel, config: ResSVDConfig, calib: str | None = None,
                    factors: str = "none") -> CompressionReport:
    """Compress an already loaded model in place. ``calib`` is a text file or folder (default: the
    calibration split of pydoc_data.topics). ``factors``: how the package being built will round the
    factors ("int4", "int8" or "none"), what ``quant_aware="auto"`` tunes them for."""
    if config.quant_aware == "auto":
        config = dataclasses.replace(config, quant_aware=factors if config.tune_steps else "none")
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if positions and config.calib_length > positions:  # a learned position table has no row past its end
        config = dataclasses.replace(config, calib_length=int(positions))
    windows = []
    if config.method != "svd":
        corpus = texts.read_text(calib) if calib else texts.calibration_text()
        windows = calibration_windows(loaded.tokenizer, corpus, config.calib_windows, config.calib_length)
    converted = conv1d.to_linear(loaded.model)
    try:
        return compress_(loaded.model, config, windows)
    finally:  # the layers left dense go back to the layout the model's config loads
        conv1d.restore(loaded.model, converted)


def compress(spec: str, config: ResSVDConfig, output: Path | str, calib: str | None = None) -> CompressionReport:
    from edgepack.toolchain.delta.extract import fingerprint
    from edgepack.toolchain.ressvd import storage

    loaded = sources.load(spec)
    base = fingerprint(loaded.model)  # before compression: deltas are made against the source weights
    report = compress_loaded(loaded, config, calib)
    storage.save(loaded.model, loaded.tokenizer, output,
                 {**report.to_dict(), "source": loaded.source.to_dict(), "base_fingerprint": base})
    return report
