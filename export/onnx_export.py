"""Export a causal LM (dense or with factorized linear layers) to ONNX with a KV cache.

optimum's exporter does the tracing: it covers many architectures, and it keeps a linear layer
replaced by ``nn.Sequential(Linear, Linear)`` as two MatMuls, which compressed models need.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.runtime.manifest import MODEL_NAME

TASK = "text-generation-with-past"
# What tracing a configuration the exporter mishandles raises (e.g. Falcon's grouped KV heads: a cache concat).
_TRACE_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError)


def supported_model_types() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills the exporter registry)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(TASK, exporter="onnx"))


def check_exportable(config: Any) -> None:
    """Refuse, by name, a model type the exporter cannot trace with a KV cache."""
    model_type = config.model_type
    supported = supported_model_types()
    if model_type.replace("_", "-") not in supported and model_type not in supported:
        raise UnsupportedArchitecture(
            f"model type '{model_type}' cannot be exported with a KV cache yet "
            f"(supported: {', '.join(supported)})"
        )


def export(model: Any, out_dir: Path, opset: int | None = None) -> list[Path]:
    """Write ``model.onnx`` (and its external data file, if any) into ``out_dir``; return the files."""
    from optimum.exporters.onnx import onnx_export_from_model

    check_exportable(model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-export-") as tmp, _quiet():
        # Our own parity check follows, on real prompts through the runtime, so optimum's is skipped.
        try:
            onnx_export_from_model(model, tmp, task=TASK, opset=opset, do_validation=False)
        except _TRACE_ERRORS as e:  # not OSError / MemoryError: a full disk or RAM is not the architecture's fault
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UnsupportedArchitecture(f"optimum's exporter failed on model type '{model.config.model_type}' "
                                          f"({type(e).__name__}: {first}); this model cannot be packaged yet") from None
        produced = [p for p in Path(tmp).iterdir() if p.name.startswith(MODEL_NAME)]
        files = []
        for p in produced:
            dest = out_dir / p.name
            shutil.move(str(p), dest)
            files.append(dest)
    return sorted(files)


@contextlib.contextmanager
def _quiet():
    """The exporter prints tracer warnings by the hundred; keep the user's terminal readable."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
