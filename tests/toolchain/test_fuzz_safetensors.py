"""Hostile safetensors where edgepack reads them (a ResSVD-compressed model folder): oversize header
lengths, bad JSON, offsets out of range, overlaps, and dtype/shape mismatches against the model all end
in a ModelSourceError, never another exception or a hang."""

import json
import shutil
import struct

import pytest
from edgepack.runtime.errors import ModelSourceError
from edgepack.toolchain.safetensors_check import ITEMSIZE, check_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_counts import count

FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
DTYPES = st.sampled_from([*ITEMSIZE, "F31", "", 7])
COUNTS = st.one_of(st.integers(0, 64), st.integers(-3, 2**66), st.floats(), st.text(max_size=3), st.none())


@pytest.fixture(scope="module")
def compressed(tiny_model_dir, tmp_path_factory):
    from edgepack.toolchain.compression import compress
    from edgepack.toolchain.ressvd import ResSVDConfig

    out = tmp_path_factory.mktemp("st") / "compressed"
    compress(str(tiny_model_dir), ResSVDConfig(ratio=0.2, method="svd", layers=2), out)
    return out


def safetensors_bytes(header, data=b"", declared=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def split(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


@settings(max_examples=300, deadline=5000, suppress_health_check=FIXTURES)
@given(st.binary(max_size=300))
def test_random_bytes(tmp_path_factory, blob):
    count("fuzz")
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelSourceError):
        check_file(path)


entries = st.fixed_dictionaries({"dtype": DTYPES, "shape": st.one_of(st.lists(COUNTS, max_size=3), COUNTS),
                                 "data_offsets": st.one_of(st.lists(COUNTS, max_size=3), COUNTS)})


@settings(max_examples=400, deadline=5000, suppress_health_check=FIXTURES)
@given(st.dictionaries(st.text(max_size=6), entries | st.integers() | st.text(max_size=4), max_size=4),
       st.binary(max_size=128), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_generated_headers(tmp_path_factory, header, data, declared):
    count("fuzz")
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, data, declared))
    try:
        tensors = check_file(path)
    except ModelSourceError:
        return
    for entry in tensors.values():  # accepted only with every tensor inside the data
        begin, end = entry["data_offsets"]
        assert 0 <= begin <= end <= len(data)


MUTATIONS = ["dtype", "shape", "offsets", "header_length", "json", "drop", "rename"]


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(st.sampled_from(MUTATIONS), st.data())
def test_mutated_compressed_model_folder(tmp_path_factory, compressed, mutation, data):
    """Through the real loader: ``storage.load`` rebuilds the factorized model and reads the file."""
    count("fuzz")
    from edgepack.toolchain.ressvd import storage
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("st") / "m"
    shutil.copytree(compressed, folder)
    path = folder / storage.WEIGHTS_NAME
    header, payload = split(path.read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    declared = None
    raw = None
    if mutation == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "I8", "F64", "I32"]))
    elif mutation == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(0, 300), min_size=1, max_size=3))
    elif mutation == "offsets":
        header[name]["data_offsets"] = data.draw(st.lists(st.integers(0, 2**40), min_size=2, max_size=2))
    elif mutation == "header_length":
        declared = data.draw(st.one_of(st.integers(0, 7), st.integers(len(payload) + 10**4, 2**64 - 1)))
    elif mutation == "json":
        raw = data.draw(st.binary(min_size=1, max_size=64))
    elif mutation == "drop":
        del header[name]
    else:
        header[name + ".x"] = header.pop(name)
    if raw is not None:
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    else:
        path.write_bytes(safetensors_bytes(header, payload, declared))
    config = AutoConfig.from_pretrained(folder)
    with pytest.raises(ModelSourceError):
        storage.load(folder, config)


def test_real_file_passes(compressed):
    from edgepack.toolchain.ressvd import storage

    tensors = check_file(compressed / storage.WEIGHTS_NAME)
    assert any(k.endswith(".0.weight") for k in tensors)  # the factor pairs are there
