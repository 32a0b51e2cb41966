"""One settings model for the whole build: loaded from a TOML recipe, overridden with dotted keys.

    settings = load_settings("recipes/demo.toml", overrides=["train.lr=3e-4"])

Every key has one name, used in the recipe, on the command line (`--set`) and in the logs.
Validation errors name the key, what was given and what is allowed.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from murmur.errors import SettingsError
from murmur.settings.base import Section
from murmur.settings.data import DataSettings
from murmur.settings.eval import EvalSettings
from murmur.settings.index import IndexSettings
from murmur.settings.model import MODEL_PRESETS, ModelSettings, RopeScaling
from murmur.settings.serve import ServeSettings
from murmur.settings.tokenizer import TokenizerSettings
from murmur.settings.train import SFTSettings, TrainSettings

__all__ = ["Settings", "RunSettings", "ModelSettings", "RopeScaling", "MODEL_PRESETS", "load_settings",
           "settings_from_dict", "apply_overrides"]


class RunSettings(Section):
    """Names the build and the folder its stages write into."""

    name: str = "run"
    dir: str | None = Field(None, description="run folder; default runs/NAME next to the recipe")


class Settings(Section):
    """Everything a build needs, one section per stage."""

    run: RunSettings = Field(default_factory=RunSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)

    def to_toml_dict(self) -> dict[str, Any]:
        """The settings as plain data, None values left out (TOML has no null)."""
        return self.model_dump(mode="json", exclude_none=True)


def _allowed_keys(model_cls: type[Section]) -> list[str]:
    return sorted(model_cls.model_fields)


def _section_class(path: tuple[Any, ...]) -> type[Section] | None:
    """The settings class that holds the key at `path` (for listing allowed keys)."""
    cls: Any = Settings
    for part in path[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        cls = field.annotation
        args = getattr(cls, "__args__", None)
        if args:  # Optional[Section]
            cls = next((a for a in args if isinstance(a, type) and issubclass(a, Section)), None)
        if not (isinstance(cls, type) and issubclass(cls, Section)):
            return None
    return cls


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            cls = _section_class(loc)
            allowed = _allowed_keys(cls) if cls else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown setting '{key}'"
            if hint:
                msg += f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?)"
            if allowed:
                msg += f"; allowed in [{'.'.join(str(p) for p in loc[:-1]) or 'top level'}]: {', '.join(allowed)}"
            lines.append(msg)
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"setting '{key}': {item['msg'].removeprefix('Value error, ')}{shown}")
    return f"{origin}: " + "; ".join(lines)


def settings_from_dict(data: dict[str, Any], origin: str = "settings") -> Settings:
    """Validate a plain dict into Settings, turning pydantic's report into one readable line."""
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise SettingsError(_format_validation_error(err, origin)) from None


def _parse_value(text: str) -> Any:
    """A value from the command line, read as TOML (numbers, booleans, lists, quoted strings) or else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a recipe dict (in a copy)."""
    import copy

    result = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value.strip())
    return result


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The raw TOML of a recipe, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"recipe {path} not found; pass the path of a TOML recipe such as recipes/demo.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"recipe {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"recipe {path} is not UTF-8 text") from None


def load_settings(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Settings from a recipe file (or defaults) with `--set` overrides applied, validated."""
    data = read_recipe(recipe) if recipe is not None else {}
    data = apply_overrides(data, overrides or [])
    return settings_from_dict(data, origin=str(recipe) if recipe else "settings")


def run_dir(settings: Settings) -> Path:
    """The folder a build writes into: `run.dir`, or runs/NAME under the current directory."""
    return Path(settings.run.dir or Path("runs") / settings.run.name)
