"""Hostile input to the package loaders: every input ends in a typed PackageError, never a crash."""

import json

from edgepack.runtime.errors import PackageError
from edgepack.runtime.manifest import GenerationSettings, Manifest
from edgepack.runtime.package import open_package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_counts import count

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_manifest_text_never_crashes(text):
    count("fuzz")
    try:
        Manifest.from_json(text)
    except PackageError:
        pass


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_manifest_json_values_never_crash(value):
    count("fuzz")
    try:
        Manifest.from_json(json.dumps(value))
    except PackageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "dtype", "model", "files", "plan", "parity", "build",
                                        "format_version", "extra"]), json_values, max_size=8))
def test_manifest_shaped_objects_never_crash(data):
    count("fuzz")
    try:
        Manifest.from_dict(data)
    except PackageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["eos_token_ids", "context_length", "bos_token_id", "temperature",
                                        "top_k", "other"]), json_values, max_size=6))
def test_generation_settings_never_crash(data):
    count("fuzz")
    try:
        GenerationSettings.from_dict(data)
    except PackageError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.sampled_from(["manifest.json", "generation.json"]))
def test_package_with_hostile_file_never_crashes(tmp_path_factory, tiny_package, blob, target):
    count("fuzz")
    import shutil

    pkg = tmp_path_factory.mktemp("fuzz") / "pkg"
    shutil.copytree(tiny_package, pkg)
    (pkg / target).write_bytes(blob)
    for verify in (True, False):  # without verification the parsers see the hostile bytes themselves
        try:
            open_package(pkg, verify=verify)
        except PackageError:
            pass


GOOD_GENERATION = {"eos_token_ids": [2], "context_length": 64, "bos_token_id": 1, "temperature": 1.0, "top_k": 0}
GOOD_MANIFEST = {"name": "x", "dtype": "float32", "model": {}, "plan": {}, "format_version": 1,
                 "files": {n: {"size": 1, "sha256": "0" * 64} for n in ("model.onnx", "tokenizer.json",
                                                                       "generation.json")}}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(GOOD_GENERATION)), json_values | st.lists(json_values, max_size=3))
def test_one_bad_field_in_good_generation_settings(key, value):
    count("fuzz")
    try:
        GenerationSettings.from_dict({**GOOD_GENERATION, key: value})
    except PackageError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(GOOD_MANIFEST)), json_values)
def test_one_bad_field_in_a_good_manifest(key, value):
    count("fuzz")
    try:
        Manifest.from_dict({**GOOD_MANIFEST, key: value})
    except PackageError:
        pass
