"""Fingerprints of settings by dotted key: what a step read, hashed, so that a change to it is noticed.

    settings_by_key(settings, ["tokenizer", "model.base"], ignore=["tokenizer.seed"])
        -> {"tokenizer": {...every tokenizer key but seed...}, "model.base": "..."}
    digest({"settings": ..., "files": ...}) -> "3f2a9c..."

A key names a whole section or one setting. Readers name sections and `ignore` the few settings they do
not use, rather than list the ones they do: a setting added later is then covered without editing any list
(at worst it reruns a step for nothing, never skips one that was needed). `check_keys` refuses a key the
settings do not have, so a misspelled key fails where it is declared instead of fingerprinting nothing.
The build's stage fingerprints, the data pipeline's resume fingerprint and the tokenize stage's skip
fingerprint are all made here.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from murmur.errors import SettingsError


def digest(payload: Any) -> str:
    """16 hex characters of SHA-256 over the canonical JSON of `payload` (sorted keys, no spaces)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_under(key: str, prefixes: Iterable[str]) -> bool:
    """Whether dotted `key` is one of `prefixes` or lies inside one of them ("a.b" is under "a")."""
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def settings_by_key(settings: BaseModel, keys: Iterable[str] | None = None, ignore: Iterable[str] = ()
                    ) -> dict[str, Any]:
    """{key: value as plain JSON data} for each dotted key (every top-level key when `keys` is None),
    less the dotted keys in `ignore`, wherever they lie inside a selected section."""
    data = settings.model_dump(mode="json")
    ignore = tuple(ignore)
    selected: dict[str, Any] = {}
    for key in (list(data) if keys is None else keys):
        if is_under(key, ignore):
            continue
        node: Any = data
        for part in key.split("."):
            node = node[part]
        selected[key] = _without(node, key, ignore)
    return selected


def _without(node: Any, prefix: str, ignore: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    return {k: _without(v, f"{prefix}.{k}", ignore) for k, v in node.items() if not is_under(f"{prefix}.{k}", ignore)}


def check_keys(model: type[BaseModel], keys: Iterable[str], owner: str) -> None:
    """Raise SettingsError naming `owner` for any dotted key `model` does not have."""
    for key in keys:
        cls: Any = model
        for depth, part in enumerate(key.split(".")):
            fields = cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else {}
            if part not in fields:
                where = ".".join(key.split(".")[:depth]) or "the top level"
                known = ", ".join(sorted(fields)) or "none: it is a single setting"
                raise SettingsError(f"{owner}: unknown setting '{key}' ({where} has {known}); "
                                    "name a section or a dotted key of murmur.config.Settings")
            cls = _section_class(fields[part].annotation)


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The settings class a field holds, also when optional (`Section | None`); None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                    None)
    return None
