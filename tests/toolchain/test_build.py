import pytest
from edgepack.runtime import open_package
from edgepack.toolchain import build as build_mod


def test_failure_mid_build_keeps_previous_package(tiny_model_dir, tiny_package, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    before = (out / "manifest.json").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(build_mod.package_writer, "write_generation", fail)
    with pytest.raises(OSError, match="disk full"):
        build_mod.build(build_mod.BuildConfig(model=str(tiny_model_dir)), out)
    assert (out / "manifest.json").read_bytes() == before
    open_package(out)  # still complete and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_generation_settings_capture_tokens_and_context(tiny_package):
    gen = open_package(tiny_package).generation
    assert gen.eos_token_ids == (2,)
    assert gen.context_length == 256  # the tiny model's max positions caps the default 2048
    assert gen.eos_token == "<|im_end|>"
