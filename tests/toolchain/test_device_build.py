"""``build --device`` on the tiny model: the plan drives dtype, ranks and the mobile files."""

import json

import pytest
from edgepack.runtime import load
from edgepack.runtime.cli import main
from edgepack.runtime.memory import estimate_package
from edgepack.runtime.package import open_package, read_manifest
from edgepack.runtime.profiles import DeviceProfile
from edgepack.toolchain.planner.plan import candidates, graph_for, model_config, model_shape

MB = 1 << 20


@pytest.fixture(scope="module")
def phone_build(tiny_model_dir, tmp_path_factory):
    from edgepack.toolchain.planner.device_build import build_for_device

    root = tmp_path_factory.mktemp("device")
    shape = model_shape(str(tiny_model_dir))
    graph = graph_for(model_config(str(tiny_model_dir)))
    compressed = next(c for c in candidates(shape, 256, graph) if c.ratio > 0)
    phone = DeviceProfile(name="tiny-phone", description="made-up phone", kind="phone", ram_mb=1000,
                          app_memory_mb=round(compressed.estimate.peak / MB, 3) + 0.001, storage_mb=100, cores=2,
                          cpu="test", arch="aarch64", execution_providers=("CPUExecutionProvider",))
    profile_path = root / "tiny-phone.yaml"
    profile_path.write_text(phone.to_yaml())
    plan, manifest = build_for_device(str(tiny_model_dir), str(profile_path), root / "pkg")
    return plan, manifest, root / "pkg", profile_path


def test_plan_drives_the_build(phone_build):
    plan, manifest, pkg, _ = phone_build
    assert plan.dtype == "int4" and plan.ratio > 0 and plan.ranks
    # a Llama-family model gets the fused graph, whose int4 layout is the plain fused --int4 one
    assert plan.graph == "fused" and manifest.plan["graph"] == "fused"
    assert manifest.dtype == "int4" and manifest.plan["layout"] is None
    assert manifest.plan["device"] == plan.to_dict()
    assert manifest.plan["compression"]["ranks"] == plan.ranks
    assert {"model.onnx", "model.onnx.data"} <= set(manifest.files)


def test_phone_build_lists_ort_format_and_operator_config(phone_build):
    _, manifest, pkg, _ = phone_build
    assert {"model.ort", "required_operators.config"} <= set(manifest.files)
    assert manifest.plan["mobile"] == {"ort_model": "model.ort", "operator_config": "required_operators.config"}
    assert "MatMulNBits" in (pkg / "required_operators.config").read_text()
    open_package(pkg)  # every listed file verifies


def test_device_package_generates_and_is_estimated(phone_build):
    plan, _, pkg, _ = phone_build
    # ignore_eos: a random tiny model may well pick its end token first; the package must still decode
    assert len(load(pkg).generate("Hello", max_new_tokens=4, ignore_eos=True).tokens) == 4
    est = estimate_package(pkg, context=plan.context, chunk=plan.memory["chunk"])
    assert est.stored_weights == sum(f.stat().st_size for f in pkg.glob("model.onnx*"))


def test_bench_against_device(phone_build, tmp_path, capsys):
    _, _, pkg, profile_path = phone_build
    out = tmp_path / "bench.json"
    code = main(["bench", str(pkg), "--device", str(profile_path), "--max-tokens", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["peak_rss_bytes"] > 0 and report["tokens_per_s"] > 0
    assert code == (0 if report["device"]["fits"] else 3)
    assert "tiny-phone: peak" in capsys.readouterr().out


def test_plan_cli(tiny_model_dir, capsys):
    assert main(["plan", str(tiny_model_dir), "--device", "raspberry-pi-5"]) == 0
    assert "dtype        float32" in capsys.readouterr().out
    assert main(["plan", str(tiny_model_dir), "--device", "esp32-s3"]) == 2
    assert "cannot fit esp32-s3" in capsys.readouterr().err


def test_profile_cli_lists_and_saves(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEPACK_DEVICES", str(tmp_path))
    assert main(["profile", "--list"]) == 0
    assert "raspberry-pi-zero-2w" in capsys.readouterr().out
    assert main(["profile", "--save", "this-box"]) == 0
    saved = DeviceProfile.from_yaml((tmp_path / "this-box.yaml").read_text())
    assert saved.kind == "host" and saved.cores >= 1


def test_build_cli_with_device_proves_the_fit(tiny_model_dir, tmp_path, capsys):
    roomy = DeviceProfile(name="roomy", description="made-up", kind="sbc", ram_mb=8000, app_memory_mb=4000,
                          storage_mb=1000, cores=4, cpu="test", arch="aarch64")
    path = tmp_path / "roomy.yaml"
    path.write_text(roomy.to_yaml())
    assert main(["build", str(tiny_model_dir), "--device", str(path), "-o", str(tmp_path / "pkg")]) == 0
    err = capsys.readouterr().err
    assert "dtype        float32" in err and "measured peak RSS" in err and ": fits" in err
    assert read_manifest(tmp_path / "pkg").plan["device"]["device"] == "roomy"


def test_device_build_keeps_delta_slots(tiny_model_dir, tiny_finetune_dir, tmp_path):
    # --device chose dtype and ranks but dropped --delta-slots (a package that then refused every delta)
    from edgepack.toolchain.delta.make import DeltaConfig, make
    from edgepack.toolchain.planner.device_build import build_for_device

    _, manifest = build_for_device(str(tiny_model_dir), "raspberry-pi-4", tmp_path / "pkg", delta_slots=True)
    assert manifest.plan["config"]["delta_slots"]
    delta = make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="truncsvd", rank=2))
    model = load(tmp_path / "pkg", delta=delta)
    assert model.delta is delta
