"""End to end on the real default model (SmolLM2-135M-Instruct): build, then answer through the
torch-free runtime. Select with ``-m e2e``; a few minutes in all."""

import subprocess
import sys

import pytest
from edgepack.runtime import load
from edgepack.runtime.manifest import Manifest

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"
# int4 (the default graph is the fused one, exact Q4_1 weights) answers QUESTION "L'Étoile, ...": a near tie
# (float32's first token "The" 25.33 against "L" 25.24) that MatMulNBits' int8 activations flip, as llama.cpp's
# do: llama.cpp on the same GGUF gives "L'Étoile" too, and both agree token for token on other capital questions.
# So int4 is asked the question in a form that is not a near tie.
INT4_QUESTION = "Which city is the capital of France?"


def _question(package) -> str:
    return INT4_QUESTION if package.name == "int4" else QUESTION


@pytest.fixture(scope="module", params=["float32", "int4"])
def default_package(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / request.param
    argv = ["edgepack", "build", "default", "-o", str(out)] + (["--int4"] if request.param == "int4" else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_build_records_passing_parity(default_package):
    manifest = Manifest.from_json((default_package / "manifest.json").read_text())
    assert manifest.model["model_type"] == "llama" and manifest.model["layers"] == 30
    assert manifest.plan["graph"] == "fused"  # the default for the Llama family
    assert manifest.parity["float32"]["passed"]
    assert manifest.model["source"]["kind"] == "default"


def test_run_answers_paris(default_package):
    proc = subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "run", str(default_package),
                           _question(default_package),
                           "--max-tokens", "32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_chat_session_keeps_context(default_package):
    model = load(default_package)
    session = model.session()
    first = session.ask(_question(default_package), max_new_tokens=32)
    assert "Paris" in first
    cached = session.cache.length
    second = session.ask("And what is the capital of Italy?", max_new_tokens=32)
    assert "Rome" in second
    assert session.cache.length > cached
