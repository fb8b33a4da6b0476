"""Device profiles: what a target has (memory, cores, ISA, execution providers, storage).

Built-in profiles are YAML files in ``device_profiles/`` (package data ``edgepack.device_profiles``);
a user adds one by writing a YAML file into ``$EDGEPACK_DEVICES`` (default
``~/.config/edgepack/devices``) or with ``edgepack profile --save NAME``. A name may also be a path to
a ``.yaml`` file. Torch-free: a target reads its own profile with only the runtime installed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from edgepack.runtime.errors import UsageError

KINDS = ("host", "sbc", "phone", "microcontroller")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MB = 1 << 20  # one MiB: every memory figure in profiles, plans and reports uses it


class ProfileError(UsageError):
    """A device profile that is missing or does not follow the schema."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device. Memory figures in MiB; ``app_memory_mb`` is the budget the planner fits into."""

    name: str
    description: str
    kind: str  # host | sbc | phone | microcontroller; phones also get the .ort format
    ram_mb: float  # physical memory
    app_memory_mb: float  # a realistic share of it for one app (the memory budget)
    storage_mb: float  # largest package the device should hold
    cores: int
    cpu: str
    arch: str
    isa: tuple[str, ...] = ()
    execution_providers: tuple[str, ...] = ()  # onnxruntime EPs that make sense there, preferred first
    sources: tuple[str, ...] = ()  # where the figures come from
    version: int = 1

    def __post_init__(self) -> None:
        where = f"device profile {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ProfileError(f"device profile name {self.name!r} must be lowercase letters, digits, '.', '_' or '-'")
        if self.kind not in KINDS:
            raise ProfileError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for key in ("ram_mb", "app_memory_mb", "storage_mb"):
            value = getattr(self, key)
            # a chained comparison is False for NaN, which `value <= 0` let through
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ProfileError(f"{where}: {key} must be a positive number of MiB, got {value!r}")
        if self.app_memory_mb > self.ram_mb:
            raise ProfileError(f"{where}: app_memory_mb ({self.app_memory_mb}) exceeds ram_mb ({self.ram_mb})")
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ProfileError(f"{where}: cores must be a positive integer, got {self.cores!r}")
        for key in ("description", "cpu", "arch"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ProfileError(f"{where}: {key} must be a non-empty string")
        for key in ("isa", "execution_providers", "sources"):
            value = getattr(self, key)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ProfileError(f"{where}: {key} must be a list of strings")
            object.__setattr__(self, key, tuple(value))
        if self.version != 1:
            raise ProfileError(f"{where}: unknown profile version {self.version}")

    @property
    def budget_bytes(self) -> int:
        return int(self.app_memory_mb * MB)

    @property
    def storage_bytes(self) -> int:
        return int(self.storage_mb * MB)

    @property
    def mobile(self) -> bool:
        return self.kind == "phone"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("isa", "execution_providers", "sources"):
            d[key] = list(d[key])
        return d

    def to_yaml(self) -> str:
        data = self.to_dict()
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
        # PyYAML writes a NEL (U+0085) raw inside a quoted scalar, where its reader folds it to a space (a fuzz test
        # found it): such a profile is written with its non-ASCII characters escaped, which reads back exactly
        if yaml.safe_load(text) != data:
            text = yaml.safe_dump(data, sort_keys=False, width=120)
        return text

    @classmethod
    def from_dict(cls, data: Any, where: str = "device profile") -> DeviceProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {unknown}; known: {', '.join(fields)}")
        missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ProfileError(f"{where}: missing field(s) {missing}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, text: str, where: str = "device profile") -> DeviceProfile:
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:
            # PyYAML raises ValueError for impossible dates and RecursionError for deep nesting (found by fuzzing)
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ProfileError(f"{where} is not valid YAML: {first}") from None
        return cls.from_dict(data, where)


def builtin_dir() -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("edgepack.device_profiles")))
        if path.is_dir():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "device_profiles"  # a source checkout


def user_dir() -> Path:
    return Path(os.environ.get("EDGEPACK_DEVICES") or Path.home() / ".config" / "edgepack" / "devices")


def available() -> dict[str, Path]:
    """Every known profile name → its file; a user's profile shadows a built-in one of that name."""
    found: dict[str, Path] = {}
    for folder in (builtin_dir(), user_dir()):
        if folder.is_dir():
            found.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return found


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (user folder, then built-in) or from a ``.yaml`` path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith((".yaml", ".yml")) and path.is_file()):
        known = available()
        if text not in known:
            raise ProfileError(f"unknown device {text!r}; known devices: {', '.join(sorted(known))} "
                               f"(or add {user_dir() / (text + '.yaml')})")
        path = known[text]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read device profile {path}: {e}") from None
    profile = DeviceProfile.from_yaml(text, f"device profile {path}")
    if path.suffix == ".yaml" and path.stem != profile.name and path.parent != Path("."):
        if path.parent in (builtin_dir(), user_dir()):
            raise ProfileError(f"device profile {path} declares name {profile.name!r}; it must match the file name")
    return profile


def save_profile(profile: DeviceProfile, folder: Path | None = None) -> Path:
    folder = folder or user_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{profile.name}.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(profile.to_yaml(), encoding="utf-8")
    tmp.replace(path)
    return path
