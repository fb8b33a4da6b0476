"""Hostile device profiles and manifests: every input ends in a typed edgepack error, never another
exception (the YAML parser's, a TypeError from a wrong field type, ...) or a hang."""

import json
import shutil

import pytest
import yaml
from edgepack.runtime.errors import PackageError, UsageError
from edgepack.runtime.manifest import Manifest
from edgepack.runtime.package import open_package
from edgepack.runtime.profiles import DeviceProfile, ProfileError, load_profile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_counts import count

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True)
           | st.text(max_size=16))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
FIELDS = ["name", "description", "kind", "ram_mb", "app_memory_mb", "storage_mb", "cores", "cpu", "arch", "isa",
          "execution_providers", "sources", "version", "other"]
GOOD = {"name": "dev", "description": "d", "kind": "sbc", "ram_mb": 512, "app_memory_mb": 256, "storage_mb": 1000,
        "cores": 4, "cpu": "a53", "arch": "arm64", "isa": ["neon"], "execution_providers": [], "sources": []}
YAML_BITS = ["name: x\n", "ram_mb: 1e9\n", "kind: [a, b]\n", "? [a]\n: b\n", "cores: !!float 2\n", "&a [*a]\n",
             "date: 2020-13-45\n", "!!python/object:os.system ls\n", "- - - - -\n", "{a: {b: {c: }}}\n",
             "ram_mb: .inf\n", "version: 1\n", "%YAML 1.1\n---\n", "x: !!binary AAA=\n", "\t\n", "'\n"]


def never_other(fn, *args, expected=UsageError):
    try:
        fn(*args)
    except expected:
        pass


@settings(max_examples=300, deadline=5000)
@given(st.text(max_size=200))
def test_profile_text(text):
    count("fuzz")
    never_other(DeviceProfile.from_yaml, text, expected=ProfileError)


@settings(max_examples=300, deadline=5000)
@given(st.lists(st.sampled_from(YAML_BITS), max_size=6), st.text(max_size=20))
def test_profile_yaml_fragments(bits, tail):
    count("fuzz")
    never_other(DeviceProfile.from_yaml, "".join(bits) + tail, expected=ProfileError)


@settings(max_examples=300, deadline=5000)
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=14))
def test_profile_fields_of_any_type(fields):
    count("fuzz")
    never_other(DeviceProfile.from_yaml, yaml.safe_dump(fields), expected=ProfileError)


@settings(max_examples=300, deadline=5000)
@given(st.sampled_from(list(GOOD)), values)
def test_one_bad_field_in_a_good_profile(key, value):
    count("fuzz")
    data = {**GOOD, key: value}
    try:
        profile = DeviceProfile.from_dict(data)
    except ProfileError:
        return
    assert DeviceProfile.from_yaml(profile.to_yaml()) == profile  # what is accepted round-trips


@settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_profile_files(tmp_path_factory, blob):
    count("fuzz")
    path = tmp_path_factory.mktemp("prof") / "dev.yaml"
    path.write_bytes(blob)
    never_other(load_profile, str(path), expected=ProfileError)


FILE_NAMES = st.one_of(st.sampled_from(["model.onnx", "tokenizer.json", "generation.json", "../up", "/abs",
                                        "a/../../b", "manifest.json", "sub/x", "model.onnx/", "\x00"]),
                       st.text(max_size=10))
ENTRIES = st.one_of(st.fixed_dictionaries({"size": st.integers(-5, 10**6), "sha256": st.text(max_size=64)}), values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(FILE_NAMES, ENTRIES, max_size=6), st.booleans())
def test_manifest_files_table_on_a_real_package(tmp_path_factory, tiny_package, files, keep_real):
    count("fuzz")
    pkg = tmp_path_factory.mktemp("mf") / "pkg"
    shutil.copytree(tiny_package, pkg)
    data = json.loads((pkg / "manifest.json").read_text())
    data["files"] = {**(data["files"] if keep_real else {}), **files}
    (pkg / "manifest.json").write_text(json.dumps(data))
    try:
        opened = open_package(pkg)
    except PackageError:
        return
    # accepted only when every listed file is really there with its recorded digest
    assert set(opened.manifest.files) <= {p.relative_to(pkg).as_posix() for p in pkg.rglob("*")}


@pytest.mark.parametrize("text", ["[" * 10000, "{a: " * 5000, "a: &x [*x, *x]\n" * 50])
def test_deep_or_recursive_yaml(text):
    count("fuzz")
    never_other(DeviceProfile.from_yaml, text, expected=ProfileError)


def test_manifest_json_nesting_bomb():
    count("fuzz")
    with pytest.raises(PackageError):
        Manifest.from_json("[" * 100000 + "]" * 100000)
