r"""Reading an untrusted nested mapping (a spec document) key by key, naming key paths.

Theory of operation
-------------------
A spec arrives as plain data (parsed TOML, or JSON off the control socket), so every
value may be of any type and every key may be misspelt.  :class:`Table` wraps one
mapping and the key path that leads to it (``array.target.members[1]``); its getters
return a value of the asked-for kind or raise :class:`~dst.array.spec.SpecError`
naming the full key path and what was found instead.  A key absent or None takes the
getter's default; the default :data:`REQUIRED` makes it an error.  :meth:`Table.allow`
rejects keys left over, with the closest known key as a hint, and is called before
the getters so that a typo is reported as unknown rather than as a missing key.

What the keys are, and what a spec is made of, is :mod:`dst.array.specdict`'s
business; this module knows only the value grammars of :mod:`dst.units`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from dst.array.spec import SpecError
from dst.errors import ConfigError
from dst.units import parse_duration, parse_size


def describe(value: object) -> str:
    """How an error names a bad value: ``string 'x'``, ``an array``, ``a table``."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if type(value) in names:
        return f"{names[type(value)]} {value!r}"
    return "an array" if isinstance(value, list | tuple) else "a table"


REQUIRED: Any = object()  # the default of a required key: its absence is an error


class Table:
    """A mapping being validated: typed getters and a check that no key is left over."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path, f"expected a table, got {describe(data)}")
        self.data: Mapping[str, object] = data
        self.path = path

    def allow(self, *keys: str) -> None:
        """Reject keys not in ``keys`` (first, so a typo is not reported as missing)."""
        for k in self.data:
            if k not in keys:
                close = difflib.get_close_matches(str(k), keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(self.key(str(k)), f"unknown key{hint}")

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def raw(self, k: str, default: Any = REQUIRED) -> Any:
        value = self.data.get(k)
        if value is None:
            if default is REQUIRED:
                raise SpecError(self.key(k), "missing required key")
            return default
        return value

    def text(self, k: str, default: Any = REQUIRED) -> Any:
        value = self.raw(k, default)
        if value is not default and not isinstance(value, str):
            raise SpecError(self.key(k), f"expected a string, got {describe(value)}")
        return value

    def flag(self, k: str, default: bool) -> bool:
        value = self.raw(k, default)
        if not isinstance(value, bool):
            raise SpecError(self.key(k), f"expected true or false, got {describe(value)}")
        return value

    def size(self, k: str, default: Any = REQUIRED) -> Any:
        value = self.raw(k, default)
        if value is default:
            return value
        try:
            return parse_size(value)
        except ConfigError as e:
            raise SpecError(self.key(k), str(e)) from None

    def duration(self, k: str, default: float) -> float:
        value = self.raw(k, default)
        try:
            seconds = parse_duration(value)
        except ConfigError as e:
            raise SpecError(self.key(k), str(e)) from None
        if seconds <= 0:
            raise SpecError(self.key(k), "must be positive")
        return seconds

    def array(self, k: str) -> list[object]:
        value = self.raw(k, [])
        if not isinstance(value, list | tuple):
            raise SpecError(self.key(k), f"expected an array, got {describe(value)}")
        return list(value)
