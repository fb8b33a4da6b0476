import json
import os

import pytest
from edgepack.runtime import IntegrityError, PackageError, load, open_package
from edgepack.runtime.manifest import Manifest


def test_manifest_round_trip(tiny_package):
    text = (tiny_package / "manifest.json").read_text()
    manifest = Manifest.from_json(text)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.format_version == 1
    assert set(manifest.files) >= {"model.onnx", "tokenizer.json", "generation.json", "chat_template.jinja"}
    assert manifest.parity["float32"]["passed"] is True
    assert manifest.model["source"]["kind"] == "hf-folder"


def test_tampered_file_is_refused(package_copy):
    path = package_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load(package_copy)


def test_truncated_file_is_refused(package_copy):
    path = package_copy / "tokenizer.json"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(IntegrityError, match="truncated"):
        open_package(package_copy)


def test_missing_file_is_refused(package_copy):
    (package_copy / "generation.json").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        open_package(package_copy)


def test_verify_can_be_skipped(package_copy):
    path = package_copy / "chat_template.jinja"
    path.write_text(path.read_text() + " ")
    open_package(package_copy, verify=False)
    with pytest.raises(IntegrityError):
        open_package(package_copy)


def _edit_manifest(pkg, change):
    data = json.loads((pkg / "manifest.json").read_text())
    change(data)
    (pkg / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format_version=99), "format version 99"),
        (lambda d: d["files"].update({"../evil": {"size": 1, "sha256": "0"}}), "unsafe file name"),
        (lambda d: d["files"].pop("model.onnx"), "does not list model.onnx"),
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d.pop("files"), "no 'files' table"),
    ],
)
def test_malformed_manifest_is_refused(package_copy, change, message):
    _edit_manifest(package_copy, change)
    with pytest.raises(PackageError, match=message):
        open_package(package_copy)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="not found"):
        open_package(tmp_path / "nothing")
    with pytest.raises(PackageError, match="no manifest.json"):
        open_package(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(PackageError, match="not valid JSON"):
        open_package(tmp_path)
