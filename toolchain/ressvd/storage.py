"""Save a compressed model as safetensors + config, and rebuild it from them.

The folder is a normal Hugging Face model folder (config.json, tokenizer files) whose weights file
holds the factor pairs (``...q_proj.0.weight`` = B, ``...q_proj.1.weight`` = A), plus
``edgepack_compression.json`` recording every factorized layer's rank, from which ``load`` rebuilds
the paired modules before loading the weights strictly (every key and shape must match). Joint groups
(joint.py), recorded under ``"groups"`` (absent in older folders), share one in→r factor, stored once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.runtime.errors import ModelSourceError
from edgepack.runtime.files import atomic_dir

COMPRESSION_NAME = "edgepack_compression.json"
WEIGHTS_NAME = "model.safetensors"


def save(model: Any, tokenizer: Any, folder: Path | str, report: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    with atomic_dir(Path(folder)) as staging:
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS_NAME))  # de-duplicates the tied embedding
        (staging / COMPRESSION_NAME).write_text(json.dumps(report, indent=2) + "\n")


def is_compressed(folder: Path | str) -> bool:
    return (Path(folder) / COMPRESSION_NAME).is_file()


def load(folder: Path | str, config: Any) -> Any:
    """Rebuild the compressed model described by ``folder`` (its ``config`` already read)."""
    import torch
    from edgepack.toolchain import conv1d
    from edgepack.toolchain.ressvd.joint import empty_shared_pairs
    from edgepack.toolchain.ressvd.layers import empty_factorized, set_module
    from edgepack.toolchain.safetensors_check import check_file, expected_from_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    try:
        report = json.loads((folder / COMPRESSION_NAME).read_text())
        ranks = {str(k): int(v) for k, v in report["ranks"].items()}
        groups = [[str(n) for n in g] for g in report.get("groups", [])]
        if any(len(g) < 2 or len({ranks[n] for n in g}) != 1 for g in groups):
            raise ValueError("a joint group needs 2 or more members of one rank")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelSourceError(f"{folder / COMPRESSION_NAME} is unreadable: {e}") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for group in groups:
        dense = [model.get_submodule(n) for n in group]
        pairs = empty_shared_pairs([conv1d.dims(d) for d in dense], ranks[group[0]],
                                   [d.bias is not None for d in dense], dense[0].weight.dtype)
        for name, pair in zip(group, pairs):
            set_module(model, name, pair)
    grouped = {n for g in groups for n in g}
    for name, rank in ((n, r) for n, r in ranks.items() if n not in grouped):
        dense = model.get_submodule(name)
        set_module(model, name, empty_factorized(conv1d.dims(dense), rank,
                                                 dense.bias is not None, dense.weight.dtype))
    # The header is checked by edgepack first: lengths, offsets, and every tensor's dtype and shape
    # against the rebuilt model, so a hostile file fails with a named tensor, not deep in a loader.
    check_file(folder / WEIGHTS_NAME, expected_from_state_dict(model.state_dict()))
    try:
        load_model(model, str(folder / WEIGHTS_NAME), strict=True)
    except (RuntimeError, OSError, ValueError, SafetensorError) as e:
        raise ModelSourceError(f"the weights in {folder} do not match its compression record: {e}") from None
    model.tie_weights()
    return model.eval()
