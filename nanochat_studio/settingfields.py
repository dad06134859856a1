"""What one setting is: how a field of :class:`settings.Settings` is declared, the environment name it
is read from, how a raw value becomes the field's type, and how a secret is shown.

settings.py declares every setting with :func:`field` and reads them with :func:`convert`; its
documentation table and ``Settings.public()`` read the same metadata. Nothing here knows a particular
setting: the checks across settings stay in settings.py.

Errors: :class:`SettingsError`, whose message starts with the setting's environment name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "NCS_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting has a bad value; the message starts with the setting's environment name."""


def field(default: Any, doc: str, *, env: str | None = None, secret: bool = False, default_doc: str | None = None,
          choices: tuple[str, ...] | None = None, minimum: float | None = None,
          maximum: float | None = None) -> Any:
    """A dataclass field carrying the setting's documentation and the rules :func:`convert` applies."""
    meta = {"doc": doc, "env": env, "secret": secret, "default_doc": default_doc, "choices": choices,
            "minimum": minimum, "maximum": maximum}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def env_name(f: dataclasses.Field) -> str:
    return f.metadata.get("env") or ENV_PREFIX + f.name.upper()


def mask(value: Any) -> Any:
    """A secret's value as the `settings` command and logs show it."""
    if isinstance(value, dict):
        return {k: "***" if any(s in k.lower() for s in ("secret", "key", "token", "password")) else v
                for k, v in value.items()}
    text = str(value)
    if "://" in text:  # a URL: hide only its password
        parts = urlsplit(text)
        if parts.password:
            return text.replace(f":{parts.password}@", ":***@", 1)
        return text
    return "***"


def convert(f: dataclasses.Field, raw: Any, source: str) -> Any:
    """``raw`` (a string from the environment, or a TOML/flag value) as the field's type."""
    name, kind = env_name(f), str(f.type)

    def bad(expected: str) -> SettingsError:
        return SettingsError(f"{name}: expected {expected}, got {raw!r} (from {source})")

    if "bool" in kind:
        if raw is None and "None" in kind:
            return None
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if "None" in kind and text in ("", "auto"):
            return None
        raise bad("true or false")
    if kind == "int" or kind == "float":
        lo, hi = f.metadata["minimum"], f.metadata["maximum"]
        span = f" {lo:g}-{hi:g}" if lo is not None and hi is not None else (f" >= {lo:g}" if lo is not None else "")
        expected = ("an integer" if kind == "int" else "a number") + span
        if isinstance(raw, bool):
            raise bad(expected)
        try:
            value = int(str(raw).strip().replace("_", "")) if kind == "int" else float(raw)
        except (TypeError, ValueError):
            raise bad(expected) from None
        if (lo is not None and value < lo) or (hi is not None and value > hi) or value != value:
            raise bad(expected)
        return value
    if kind in ("list", "dict"):
        # A TOML array/table or a flag's value arrives as Python already; the environment gives JSON text.
        container, given, words = ((list, (list, tuple), "a JSON list") if kind == "list"
                                   else (dict, Mapping, "a JSON object"))
        if isinstance(raw, given):
            return container(raw)
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            raise bad(words) from None
        if not isinstance(value, container):
            raise bad(words)
        return value
    if not isinstance(raw, str):
        raise bad("a string")
    value = raw.strip()
    choices = f.metadata["choices"]
    if choices:
        value = value.lower()
        if value not in choices:
            raise bad("one of " + ", ".join(choices))
    return value
