"""End to end: the fused graph (``--graph fused``) of the real default model. Select with ``-m e2e``."""

import subprocess

import pytest
from edgepack.runtime import load
from edgepack.runtime.fused_decoder import FusedDecoder
from edgepack.runtime.manifest import Manifest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["float32", "int4"])
def fused_package(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / request.param
    argv = ["edgepack", "build", "default", "-o", str(out), "--graph", "fused"]
    proc = subprocess.run(argv + (["--int4"] if request.param == "int4" else []), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_fused_build_passes_parity_and_stores_the_embedding_once(fused_package):
    manifest = Manifest.from_json((fused_package / "manifest.json").read_text())
    assert manifest.plan["graph"] == "fused"
    assert manifest.parity["float32"]["passed"]
    if manifest.dtype == "int4":
        # Exact Q4_1 weights; what is left is MatMulNBits' int8 activations (top-1 96 % when measured).
        assert manifest.parity["int4"]["top1_agreement"] > 0.9
        assert manifest.total_size < 130e6
    else:
        assert manifest.total_size < 560e6  # one float32 copy of the tied embedding


def test_fused_package_generates_with_a_kept_cache(fused_package):
    model = load(fused_package)
    assert isinstance(model.decoder, FusedDecoder)
    session = model.session()
    session.ask("Name three colours.", max_new_tokens=16)
    cached = session.cache.length
    session.ask("And three animals?", max_new_tokens=16)
    assert session.cache.length > cached
