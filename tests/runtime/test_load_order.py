"""Loading keeps the peak low (#7): the tokenizer and its libraries come after the onnxruntime session."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.fixture(scope="module")
def fused_int4_tiny(tmp_path_factory, tiny_model_dir):
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path_factory.mktemp("fused") / "tiny-fused-int4"
    build(BuildConfig(model=str(tiny_model_dir), int4=True, graph="fused", context=128), out)
    return out


def test_runtime_import_leaves_tokenizer_libraries_for_later(tiny_int4_package):
    code = textwrap.dedent(f"""
        import sys
        import edgepack.runtime as rt
        late = ("jinja2", "tokenizers", "tqdm")
        print("AT IMPORT", sorted(m for m in late if m in sys.modules))
        model = rt.load({str(tiny_int4_package)!r})
        print("AFTER LOAD", sorted(m for m in ("jinja2", "tokenizers") if m in sys.modules))
        assert model.generate("hello", max_new_tokens=3).tokens
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "AT IMPORT []" in proc.stdout
    assert "AFTER LOAD ['jinja2', 'tokenizers']" in proc.stdout  # the package has a chat template


def test_decoder_is_made_before_the_tokenizer(tiny_int4_package, monkeypatch):
    from edgepack.runtime import model as model_module

    order: list[str] = []
    real_decoder, real_tokenizer = model_module.decoder_class, model_module.Tokenizer

    def decoder_class(graph):
        cls = real_decoder(graph)

        def make(*args, **kwargs):
            order.append("decoder")
            return cls(*args, **kwargs)

        return make

    def tokenizer(*args, **kwargs):
        order.append("tokenizer")
        return real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(model_module, "decoder_class", decoder_class)
    monkeypatch.setattr(model_module, "Tokenizer", tokenizer)
    model = model_module.load(tiny_int4_package)
    assert order == ["decoder", "tokenizer"]
    assert model.generate("hi", max_new_tokens=2).tokens


def test_fused_graph_runs_without_memory_pattern_unless_asked(fused_int4_tiny):
    from edgepack.runtime import load
    from edgepack.runtime.decoder import SessionSettings

    fused = load(fused_int4_tiny)
    assert fused.decoder.session.get_session_options().enable_mem_pattern is False
    asked = load(fused_int4_tiny, settings=SessionSettings(memory_pattern=True))
    assert asked.decoder.session.get_session_options().enable_mem_pattern is True
    assert fused.generate("hi", max_new_tokens=3).tokens == asked.generate("hi", max_new_tokens=3).tokens
    # optimum's graph (decoder.Decoder, which calls to_ort() plainly) keeps onnxruntime's default
    assert SessionSettings().to_ort().enable_mem_pattern is True
    assert SessionSettings(memory_pattern=False).to_ort().enable_mem_pattern is False
