"""Shared fixtures: a tiny random Llama in a Hugging Face folder, and packages built from it once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_model_dir) -> Path:
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path_factory.mktemp("packages") / "tiny-f32"
    build(BuildConfig(model=str(tiny_model_dir)), out)
    return out


@pytest.fixture(scope="session")
def tiny_int4_package(tmp_path_factory, tiny_model_dir) -> Path:
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path_factory.mktemp("packages") / "tiny-int4"
    build(BuildConfig(model=str(tiny_model_dir), int4=True), out)
    return out


@pytest.fixture
def package_copy(tiny_package, tmp_path) -> Path:
    """A private copy of the tiny package that a test may damage."""
    import shutil

    dest = tmp_path / "pkg"
    shutil.copytree(tiny_package, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_finetune_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny.save_finetune(tiny_model_dir, tmp_path_factory.mktemp("tiny-finetune"))


@pytest.fixture(scope="session")
def tiny_slots_package(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model in the fused float32 graph with delta slots."""
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path_factory.mktemp("packages") / "tiny-slots"
    build(BuildConfig(model=str(tiny_model_dir), graph="fused", delta_slots=True), out)
    return out


@pytest.fixture(scope="module")
def delta_setup(tiny_model_dir, tiny_finetune_dir):
    """The tiny base model and its fine-tune, their ΔW and four 48-token windows of validation text, loaded once
    per test module (the delta tune and pruning tests)."""
    from pydoc_data.topics import topics

    from edgepack.toolchain import sources
    from edgepack.toolchain.delta import extract

    base = sources.load(str(tiny_model_dir))
    ft = sources.load(str(tiny_finetune_dir)).model
    raw = extract.extract(base.model, ft)
    ids = base.tokenizer(" ".join(list(topics.values())[20:30]), add_special_tokens=False)["input_ids"]
    windows = [ids[i * 48:(i + 1) * 48] for i in range(4)]
    return base.model, ft, raw, windows
