"""Memory check before loading: refused with the figures when the predicted peak exceeds what is
available, overridable from Python and the CLI."""

import pytest
from edgepack.runtime import load, resources
from edgepack.runtime.cli import main
from edgepack.runtime.errors import ResourceError
from edgepack.runtime.memory import RUNTIME_BYTES
from edgepack.runtime.package import open_package


def test_tiny_package_has_a_prediction(tiny_package):
    peak = resources.predicted_peak(open_package(tiny_package))
    assert peak is not None and RUNTIME_BYTES < peak < 1 << 30


def test_device_plan_peak_is_preferred(package_copy):
    import json

    data = json.loads((package_copy / "manifest.json").read_text())
    data["plan"]["device"] = {"memory": {"peak": 123 << 20}}
    (package_copy / "manifest.json").write_text(json.dumps(data))
    assert resources.predicted_peak(open_package(package_copy)) == 123 << 20


def test_refused_with_figures_when_memory_is_short(tiny_package, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda: 10 << 20)
    with pytest.raises(ResourceError, match=r"needs about \d+ MiB .* only 10 MiB is available.*--no-memory-check"):
        load(tiny_package)
    assert load(tiny_package, check_memory=False).generate("hi", max_new_tokens=2).tokens


def test_loads_when_memory_suffices(tiny_package, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda: 64 << 30)
    load(tiny_package)


def test_cli_refuses_with_exit_2_and_flag_overrides(tiny_package, monkeypatch, capsys):
    monkeypatch.setattr(resources, "available_bytes", lambda: 10 << 20)
    assert main(["run", str(tiny_package), "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predicted peak" in err and "Traceback" not in err
    assert main(["run", str(tiny_package), "hi", "--max-tokens", "2", "--no-memory-check"]) == 0
