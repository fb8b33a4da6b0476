"""Device profiles: every built-in one validates and round-trips; schema errors are clear."""

import pytest
import yaml
from edgepack.runtime import profiles
from edgepack.runtime.profiles import DeviceProfile, ProfileError

REQUIRED = ["raspberry-pi-5", "raspberry-pi-4", "raspberry-pi-zero-2w", "jetson-orin-nano", "android-midrange",
            "pixel-9", "iphone-15-pro", "esp32-s3", "host"]


def _valid() -> dict:
    return {"name": "board", "description": "a board", "kind": "sbc", "ram_mb": 1024, "app_memory_mb": 512,
            "storage_mb": 2048, "cores": 4, "cpu": "4x A53", "arch": "aarch64", "isa": ["neon"],
            "execution_providers": ["CPUExecutionProvider"], "sources": ["datasheet"]}


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_profiles_load_and_round_trip(name):
    p = profiles.load_profile(name)
    assert p.name == name and p.sources, "every profile notes where its figures come from"
    assert DeviceProfile.from_yaml(p.to_yaml()) == p
    assert 0 < p.app_memory_mb <= p.ram_mb


def test_a_description_with_a_line_break_yaml_folds_round_trips():
    # PyYAML folds a raw NEL (U+0085) in a quoted scalar to a space; such a profile is written escaped, others as text
    tricky = DeviceProfile.from_dict({**_valid(), "description": "board\x85two"})
    assert DeviceProfile.from_yaml(tricky.to_yaml()) == tricky
    plain = DeviceProfile.from_dict({**_valid(), "description": "carte à puce"})
    assert "carte à puce" in plain.to_yaml() and DeviceProfile.from_yaml(plain.to_yaml()) == plain


def test_phones_are_mobile():
    assert {n for n in REQUIRED if profiles.load_profile(n).mobile} == {"android-midrange", "pixel-9",
                                                                         "iphone-15-pro"}


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown field"),
    ({"kind": "toaster"}, "kind must be one of"),
    ({"app_memory_mb": 4096}, "exceeds ram_mb"),
    ({"ram_mb": -1}, "ram_mb must be a positive number"),
    ({"ram_mb": "lots"}, "ram_mb must be a positive number"),
    ({"ram_mb": float("nan")}, "ram_mb must be a positive number"),  # found by the fuzzer: NaN passed `<= 0`
    ({"storage_mb": float("inf")}, "storage_mb must be a positive number"),
    ({"cores": 0}, "cores must be a positive integer"),
    ({"isa": "neon"}, "isa must be a list of strings"),
    ({"name": "Bad Name"}, "must be lowercase"),
    ({"version": 2}, "unknown profile version"),
])
def test_schema_errors_are_clear(change, message):
    with pytest.raises(ProfileError, match=message):
        DeviceProfile.from_dict({**_valid(), **change})


def test_missing_fields_and_bad_yaml():
    data = _valid()
    del data["ram_mb"]
    with pytest.raises(ProfileError, match=r"missing field\(s\) \['ram_mb'\]"):
        DeviceProfile.from_dict(data)
    with pytest.raises(ProfileError, match="not valid YAML"):
        DeviceProfile.from_yaml("name: [unclosed")
    with pytest.raises(ProfileError, match="expected a mapping"):
        DeviceProfile.from_yaml("- just a list")


def test_unknown_device_lists_known_ones():
    with pytest.raises(ProfileError, match="unknown device 'toaster'.*raspberry-pi-5"):
        profiles.load_profile("toaster")


def test_user_profile_saved_and_found(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_DEVICES", str(tmp_path))
    prof = DeviceProfile.from_dict(_valid())
    path = profiles.save_profile(prof)
    assert path == tmp_path / "board.yaml" and yaml.safe_load(path.read_text())["ram_mb"] == 1024
    assert profiles.load_profile("board") == prof
    assert profiles.load_profile(str(path)) == prof
    assert "board" in profiles.available() and "raspberry-pi-5" in profiles.available()
