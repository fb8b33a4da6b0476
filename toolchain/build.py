"""``build``: model source → ONNX export → parity check → optional int4 / int8 → verified package."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.export import onnx_export, package_writer, parity, quantize
from edgepack.runtime import text
from edgepack.runtime.errors import UsageError
from edgepack.runtime.fused_decoder import decoder_class
from edgepack.runtime.manifest import GenerationSettings, Manifest
from edgepack.runtime.memory import DEFAULT_FACTOR_BITS, FACTOR_BITS
from edgepack.toolchain import conv1d, sources
from edgepack.toolchain.delta.extract import fingerprint
from edgepack.toolchain.ressvd import ResSVDConfig
from tqdm import tqdm

PARITY_QUESTION = "What is the capital of France?"
GRAPHS = ("auto", "optimum", "fused")


@dataclass(frozen=True)
class BuildConfig:
    """What to build. ``context`` caps the package's context length (the model's own max if larger
    is never exceeded); ``int4`` (or ``int8``) quantizes every linear weight with MatMulNBits. ``graph``: "optimum"
    (optimum's export, any architecture it traces), "fused" (edgepack's Llama-family graph: faster, see
    #7) or "auto" (fused where the architecture has it, else optimum)."""

    model: str = sources.DEFAULT
    int4: bool = False
    context: int = 2048
    compression: ResSVDConfig | None = None
    calib: str | None = None
    graph: str = "auto"
    int4_all: bool = False  # with int4: embedding and LM head int4 too, weights as external data (device builds)
    ort_format: bool = False  # also write model.ort and its reduced operator config (phones)
    delta_slots: bool = False  # side branches that apply OSD deltas at load time (runtime/delta.py)
    device_plan: dict[str, Any] | None = None  # the planner's Plan, recorded in the manifest
    int8: bool = False  # 8-bit MatMulNBits weights (block 32, symmetric): twice int4's size, closer to float32
    # fused int4: width of the ResSVD factor pairs' MatMulNBits (4: integer zero points; 8: symmetric, Q8_0 form)
    factor_bits: int = DEFAULT_FACTOR_BITS
    version: int = 1

    def __post_init__(self) -> None:
        if self.context < 16:
            raise UsageError(f"--context must be at least 16 tokens, got {self.context}")
        if self.graph not in GRAPHS:
            raise UsageError(f"--graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        if self.int8 and (self.int4 or self.int4_all):
            raise UsageError("choose one of --int4 and --int8")
        if self.factor_bits not in FACTOR_BITS or isinstance(self.factor_bits, bool):
            raise UsageError(f"--factor-bits must be 4 or 8, got {self.factor_bits!r}")
        if self.int4_all and self.graph == "fused":
            raise UsageError("the all-int4 device layout is built on optimum's graph: use --graph optimum")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compression"] = self.compression.to_dict() if self.compression else None
        return d


def generation_settings(model: Any, tokenizer: Any, context: int) -> GenerationSettings:
    """Special tokens and defaults the runtime needs, read once here so it needs no transformers."""
    cfg, gen = model.config, model.generation_config
    eos: list[int] = []
    for value in (gen.eos_token_id, tokenizer.eos_token_id):
        for t in value if isinstance(value, list) else [value]:
            if t is not None and t not in eos:
                eos.append(int(t))
    max_positions = getattr(cfg, "max_position_embeddings", None) or context
    return GenerationSettings(
        eos_token_ids=tuple(eos),
        context_length=min(context, max_positions),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        do_sample=bool(gen.do_sample),
        temperature=float(gen.temperature or 1.0),
        top_k=int(gen.top_k or 0),
        top_p=float(gen.top_p or 1.0),
    )


def parity_prompts(tokenizer: Any, context: int | None = None) -> list[list[int]]:
    """Real prompts: a chat question (when there is a template) and two passages of prose; each kept to
    ``context`` minus the parity check's decode steps, so a short-context package is checked too."""
    prompts = []
    if tokenizer.chat_template:
        prompts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": PARITY_QUESTION}], add_generation_prompt=True, tokenize=True))
    else:
        prompts.append(tokenizer(PARITY_QUESTION)["input_ids"])
    prose = text.evaluation_text()
    for start in (0, len(prose) // 2):
        prompts.append(tokenizer(prose[start:start + 400])["input_ids"][:64])
    room = None if context is None else max(1, context - parity.DECODE_STEPS)
    return [list(map(int, p[:room])) for p in prompts]


def build(config: BuildConfig, output: Path | str) -> Manifest:
    """Build a package at ``output`` (replaced atomically; untouched on failure)."""
    from edgepack.runtime.files import atomic_dir, work_dir

    output = Path(output)
    start = time.perf_counter()
    steps = tqdm(total=4 + (config.int4 or config.int8) + (config.compression is not None), desc="build", unit="step",
                 file=sys.stderr)
    with steps:
        steps.set_postfix_str("loading model")
        loaded = sources.load(config.model, check=_exportable_check(config.graph))
        config = resolve_graph(config, loaded.model.config)
        steps.update()
        compression = _recorded_compression(loaded.source.path)
        # Deltas name the weights they were made against: those of the uncompressed source.
        weights_fingerprint = (compression or {}).get("base_fingerprint") or fingerprint(loaded.model)
        if config.delta_slots:  # GPT-2's Conv1D as nn.Linear, the layout deltas name (the same function)
            conv1d.to_linear(loaded.model)
        if config.compression is not None:
            from edgepack.toolchain.compression import compress_loaded

            steps.set_postfix_str("compressing (ResSVD)")
            compression = compress_loaded(loaded, config.compression, config.calib, _factor_rounding(config)).to_dict()
            steps.update()
        settings = generation_settings(loaded.model, loaded.tokenizer, config.context)
        prompts = parity_prompts(loaded.tokenizer, settings.context_length)
        with atomic_dir(output) as staging, work_dir(output) as work:
            steps.set_postfix_str("exporting to ONNX")
            t0 = time.perf_counter()
            float_files = _export(config, loaded.model, Path(work) / "float32", settings.context_length, False)
            export_s = time.perf_counter() - t0
            steps.update()
            steps.set_postfix_str("checking parity")
            runtime_decoder = decoder_class(config.graph)
            float_report = parity.check(loaded.model, float_files[0], prompts, decoder_class=runtime_decoder)
            reports = {"float32": float_report.to_dict()}
            steps.update()
            if config.int4 or config.int8:
                steps.set_postfix_str(f"quantizing to {_dtype(config)}")
                if config.graph == "fused":
                    _export(config, loaded.model, staging, settings.context_length, True)
                elif config.int4_all:
                    from edgepack.toolchain.device_layout import quantize_all_int4

                    quantize_all_int4(float_files[0], staging / float_files[0].name)
                else:
                    quantize.quantize_int4(float_files[0], staging / float_files[0].name,
                                           quantize.Int4Config(bits=8 if config.int8 else 4))
                reports[_dtype(config)] = parity.compare(loaded.model, staging / float_files[0].name, prompts,
                                                 decoder_class=runtime_decoder).to_dict()
                steps.update()
            else:
                for f in float_files:
                    shutil.move(str(f), staging / f.name)
            steps.set_postfix_str("writing package")
            tok = loaded.tokenizer
            package_writer.write_tokenizer_files(staging, tok.backend_tokenizer.to_str(), tok.chat_template)
            package_writer.write_generation(staging, settings)
            if config.ort_format:
                from edgepack.toolchain.device_layout import write_ort_format

                steps.set_postfix_str("writing the .ort format")
                write_ort_format(staging)
            manifest = package_writer.write_manifest(
                staging,
                name=output.name,
                dtype=_dtype(config),
                model={**_model_info(loaded), "weights_fingerprint": weights_fingerprint},
                plan={"config": config.to_dict(), "compression": compression, "graph": config.graph,
                      "weights": _weights_description(config), "context_length": settings.context_length,
                      **_device_entries(config)},
                parity=reports,
                build={"seconds": round(time.perf_counter() - start, 1), "export_seconds": round(export_s, 1),
                       "load_seconds": round(loaded.load_seconds, 1), "edgepack": _version()},
            )
            steps.update()
    return manifest


def _device_entries(config: BuildConfig) -> dict[str, Any]:
    """Manifest plan entries of a device build (``edgepack build --device``)."""
    if config.device_plan is None and not config.int4_all and not config.ort_format:
        return {}
    from edgepack.toolchain.device_layout import ORT_CONFIG_NAME, ORT_NAME

    weights = {"weights": "int4 everywhere (MatMulNBits + GatherBlockQuantized embedding, block 32, asymmetric), "
                          "external data"} if config.int4_all else {}
    return {**weights, "device": config.device_plan, "layout": "int4" if config.int4_all else None,
            "mobile": {"ort_model": ORT_NAME, "operator_config": ORT_CONFIG_NAME} if config.ort_format else None}


def resolve_graph(config: BuildConfig, model_config: Any) -> BuildConfig:
    """``graph="auto"`` made concrete: the fused graph when the architecture has one, else optimum's
    export, saying why on stderr. The all-int4 layout (``int4_all``: int4 embedding) is optimum's; device
    builds name their plan's graph."""
    if config.graph != "auto":
        return config
    from edgepack.export import fused
    from edgepack.runtime.errors import UnsupportedArchitecture

    reason = "the all-int4 layout is made on it" if config.int4_all else _expert_slots(config, model_config)
    if not reason:
        try:
            fused.check_supported(model_config)
            return dataclasses.replace(config, graph="fused")
        except UnsupportedArchitecture as e:
            reason = f"no fused graph: {str(e).split(';')[0]}"
    print(f"edgepack: building optimum's graph ({reason})", file=sys.stderr)
    return dataclasses.replace(config, graph="optimum")


def _expert_slots(config: BuildConfig, model_config: Any) -> str:
    """Why a ``--delta-slots`` build of a mixture of experts goes to optimum's graph ("" where it does not): the
    fused graph's MoE op has no slots for the experts, which a full fine-tune's delta changes, and optimum's graph
    has one beside every expert's MatMul. A model optimum cannot export keeps the fused graph, whose other layers
    take deltas."""
    from edgepack.export.fused.moe import STACKED_EXPERT_TYPES, experts_of
    from edgepack.runtime.errors import UnsupportedArchitecture

    if not config.delta_slots or experts_of(model_config) < 2:
        return ""
    if getattr(model_config, "model_type", "") in STACKED_EXPERT_TYPES:  # optimum's graph would not slot them either
        return ""
    try:
        onnx_export.check_exportable(model_config)
    except UnsupportedArchitecture:
        return ""
    return "delta slots for the experts of a mixture of experts"


def _factor_rounding(config: BuildConfig) -> str:
    """How the package rounds ResSVD factors, for a quantization-aware tune ("none": float32, or optimum's
    quantizer, whose rounding the tune does not reproduce)."""
    if config.graph != "fused":
        return "none"
    return f"int{config.factor_bits}" if config.int4 else "int8" if config.int8 else "none"


def _exportable_check(graph: str) -> Any:
    from edgepack.export import fused

    if graph == "fused":
        return fused.check_supported
    if graph == "optimum":
        return onnx_export.check_exportable
    return _either_graph  # auto


def _either_graph(model_config: Any) -> None:
    """``--graph auto``'s check: the fused graph or optimum's exporter takes the model (types optimum cannot
    export, such as StarCoder2 or EXAONE 4, build on the fused graph)."""
    from edgepack.export import fused
    from edgepack.runtime.errors import UnsupportedArchitecture

    try:
        fused.check_supported(model_config)
    except UnsupportedArchitecture as no_fused:
        try:
            onnx_export.check_exportable(model_config)
        except UnsupportedArchitecture as e:
            raise UnsupportedArchitecture(f"{e}; nor has it a fused graph ({str(no_fused).split(';')[0]})") from None


def _dtype(config: BuildConfig) -> str:
    return "int4" if config.int4 else "int8" if config.int8 else "float32"


def _export(config: BuildConfig, model: Any, out_dir: Path, context: int, quantized: bool) -> list[Path]:
    """The float32 (or, for the fused graph, directly int4 / int8) ONNX files of ``model`` in ``out_dir``."""
    if config.graph == "fused":
        from edgepack.export import fused

        return fused.export(model, out_dir, context, quantized and config.int4, config.delta_slots,
                            int8=quantized and config.int8, factor_bits=config.factor_bits)
    files = onnx_export.export(model, out_dir)
    if config.delta_slots:
        from edgepack.export.delta_branches import add_delta_slots

        add_delta_slots(model, files[0])
    return files


def _weights_description(config: BuildConfig) -> str:
    if config.graph == "fused":
        from edgepack.export import fused

        return fused.weights_description(config.int4, config.int8, config.factor_bits)
    if config.int8:
        return "int8 (MatMulNBits, block 32, symmetric)"
    return "int4 (MatMulNBits, block 32, asymmetric)" if config.int4 else "float32"


def _recorded_compression(path: str) -> dict[str, Any] | None:
    """The compression report of a folder written by ``edgepack compress``, if it is one."""
    from edgepack.toolchain.ressvd import storage

    if not storage.is_compressed(path):
        return None
    return json.loads((Path(path) / storage.COMPRESSION_NAME).read_text())


def _model_info(loaded: sources.LoadedModel) -> dict[str, Any]:
    cfg = loaded.model.config
    return {
        "source": loaded.source.to_dict(),
        "architecture": (cfg.architectures or [type(loaded.model).__name__])[0],
        "model_type": cfg.model_type,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "shape": _shape(cfg),
    }


def _shape(cfg: Any) -> dict[str, Any] | None:
    """The memory model's view of the architecture (``edgepack.runtime.memory.ModelShape``), None for one it
    cannot lay out (the runtime then checks memory by file sizes alone)."""
    from edgepack.runtime.errors import UnsupportedArchitecture
    from edgepack.toolchain.planner import shape

    try:
        return shape.from_config(cfg.to_dict(), "model").to_dict()
    except UnsupportedArchitecture:
        return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgepack")
    except PackageNotFoundError:
        return "unknown"
