"""Array specs from TOML files, with errors at ``file:line``.

Theory of operation
-------------------
:func:`load_spec` and :func:`spec_from_toml` parse TOML with :mod:`tomllib` and
validate the result with :func:`dst.array.spec.spec_from_dict`; a
:class:`~dst.array.spec.SpecError` gets the file name and the line of its key.
``tomllib`` reports no positions, so :func:`_locate` scans the source text
(best effort): it follows ``[table]`` and ``[[array-of-tables]]`` headers, counting
array indices, ``key =`` lines and one-element-per-line inline tables in multi-line
arrays.  A key it cannot find (missing, or inside a one-line inline table) is
reported at the line of its nearest enclosing table or key.
"""

from __future__ import annotations

import os
import re
import tomllib

from dst.array.spec import ArraySpec, SpecError
from dst.array.specdict import spec_from_dict
from dst.errors import ConfigError


def load_spec(path: str | os.PathLike[str]) -> ArraySpec:
    """Read and validate a TOML spec file; raises :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read spec: {e}", where=os.fspath(path)) from None
    return spec_from_toml(text, filename=os.fspath(path))


def spec_from_toml(text: str, *, filename: str = "<spec>") -> ArraySpec:
    """Parse and validate TOML text; errors name ``filename:line: key``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        where = f"{filename}:{m.group(1)}" if m else filename
        raise ConfigError(f"TOML syntax error: {e}", where=where) from None
    try:
        return spec_from_dict(data)
    except SpecError as e:
        raise SpecError(e.key, e.reason, file=filename, line=_line_of(text, e.key)) from None


def _line_of(text: str, key: str) -> int | None:
    lines = _locate(text)
    while key:
        if key in lines:
            return lines[key]
        key = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return None


_KEY_RE = re.compile(
    r"""\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_HEADER_RE = re.compile(r"\s*(\[\[?)([^\[\]]+)(\]\]?)\s*$")
_PART_RE = re.compile(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""")


def _parts(dotted: str) -> list[str]:
    return [p.strip("\"'") for p in _PART_RE.findall(dotted)]


def _locate(text: str) -> dict[str, int]:
    """Map key paths (``array.target.members[1].uri``) to 1-based line numbers."""
    found: dict[str, int] = {}
    aot: dict[str, int] = {}  # array-of-tables path -> elements seen
    table = ""
    open_array = ""  # key path of a multi-line array being read
    element = depth = 0
    in_string = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        code, in_string = _code(line, in_string)
        if open_array:
            stripped = code.strip()
            if depth == 1 and stripped and stripped[0] not in "],":
                found.setdefault(f"{open_array}[{element}]", lineno)
            depth, commas = _brackets(code, depth)
            element += commas
            open_array = open_array if depth > 0 else ""
            continue
        header = _HEADER_RE.match(code)
        if header:
            table = _resolve(_parts(header.group(2)), aot, array=header.group(1) == "[[")
            found.setdefault(table, lineno)
            if header.group(1) == "[[":
                found.setdefault(table.rsplit("[", 1)[0], lineno)
            continue
        key = _KEY_RE.match(code)
        if key:
            path = ".".join([table, *_parts(key.group(1))]).lstrip(".")
            found.setdefault(path, lineno)
            value = code[key.end() :].lstrip()
            if value.startswith("["):
                depth, element = _brackets(value, 0)
                open_array = path if depth > 0 else ""
    return found


def _brackets(code: str, depth: int) -> tuple[int, int]:
    """Bracket depth after ``code`` and the commas directly inside the outer array."""
    commas = 0
    for c in code:
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 1:
            commas += 1
    return depth, commas


def _resolve(parts: list[str], aot: dict[str, int], *, array: bool) -> str:
    path = ""
    for i, part in enumerate(parts):
        path = f"{path}.{part}" if path else part
        if array and i == len(parts) - 1:
            aot[path] = aot.get(path, 0) + 1
        if path in aot:
            path = f"{path}[{aot[path] - 1}]"
    return path


def _code(line: str, in_string: str) -> tuple[str, str]:
    """The line with comments dropped and string contents neutralised (no brackets,
    quotes or ``#`` left in them); ``in_string`` carries a multi-line string over."""
    out = []
    i = 0
    while i < len(line):
        if in_string:
            if line.startswith(in_string, i):
                i += len(in_string)
                out.append('"')
                in_string = ""
            else:
                if len(in_string) == 1:  # keep a harmless copy: quoted keys stay findable
                    out.append(line[i] if line[i].isalnum() or line[i] in "_-." else "_")
                i += 2 if in_string == '"' and line[i] == "\\" else 1
            continue
        c = line[i]
        if c == "#":
            break
        if c in "\"'":
            in_string = c * 3 if line.startswith(c * 3, i) else c
            i += len(in_string)
            out.append('"')
            continue
        out.append(c)
        i += 1
    if in_string in ('"', "'"):
        in_string = ""  # a one-line string never continues (it was a syntax error)
    return "".join(out), in_string
