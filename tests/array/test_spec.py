"""Array spec: parsing, round trips, and errors naming file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dst.array.spec import (
    ArraySpec,
    FileSpec,
    LinearPart,
    LinearSpec,
    MemorySpec,
    MirrorSpec,
    RemoteSpec,
    SpecError,
    StripeSpec,
    find_node,
    walk,
)
from dst.array.speccanon import spec_to_dict, target_to_dict
from dst.array.specdict import linear_part_from_dict, spec_from_dict, target_from_dict
from dst.array.specfile import load_spec, spec_from_toml
from dst.errors import ConfigError
from dst.net.address import Address

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))

BASE = """\
[array]
name = "demo"
listen = ["127.0.0.1:10809", "unix:/tmp/dst/demo.sock"]
io_timeout = "30s"

[array.target]
type = "mirror"
region_size = "64KiB"

[[array.target.members]]
type = "remote"
name = "node-a"
uri = "nbd://127.0.0.1:10810/"

[[array.target.members]]
type = "stripe"
chunk_size = "64KiB"
  [[array.target.members.members]]
  type = "file"
  path = "/var/lib/dst/b.img"
  size = "1GiB"
  [[array.target.members.members]]
  type = "memory"
  size = "1GiB"
"""


# -- parsing ----------------------------------------------------------------------


def test_parse_base() -> None:
    spec = spec_from_toml(BASE)
    assert spec.name == "demo"
    assert spec.listen == (Address("127.0.0.1", 10809), Address(path="/tmp/dst/demo.sock"))
    assert spec.export is None
    assert spec.io_timeout == 30.0
    mirror = spec.target
    assert isinstance(mirror, MirrorSpec)
    assert mirror.region_size == 65536
    remote, stripe = mirror.members
    assert remote == RemoteSpec(name="node-a", uri=Address("127.0.0.1", 10810))
    assert isinstance(stripe, StripeSpec)
    assert stripe.chunk_size == 65536
    assert stripe.members == (
        FileSpec(name="node3", path="/var/lib/dst/b.img", size=1 << 30),
        MemorySpec(name="node4", size=1 << 30),
    )
    # generated names follow pre-order positions
    assert [t.name for t in walk(spec.target)] == ["node0", "node-a", "node2", "node3", "node4"]
    assert find_node(spec, "node3") == stripe.members[0]
    assert find_node(spec, "nope") is None


def test_defaults() -> None:
    spec = spec_from_dict(
        {
            "array": {
                "name": "d",
                "target": {
                    "type": "stripe",
                    "members": [{"type": "memory", "size": 4096}, {"type": "memory", "size": 4096}],
                },
            }
        }
    )
    assert spec.listen == () and spec.export is None and spec.io_timeout == 30.0
    assert isinstance(spec.target, StripeSpec) and spec.target.chunk_size == 64 << 10


@pytest.mark.parametrize("kind", ["mirror", "raid5"])
def test_a_region_size_not_given_is_the_members_own(kind: str) -> None:
    """Left out, the region size stays unset (the members' own when they have
    metadata, the default for new ones) and the canonical form leaves it out too, so a
    spec written back and read again still asks for nothing."""
    members = [{"type": "memory", "size": 1 << 20} for _ in range(3)]
    spec = spec_from_dict({"array": {"name": "d", "target": {"type": kind, "members": members}}})
    assert spec.target.region_size is None  # type: ignore[union-attr]
    doc = spec_to_dict(spec)
    assert "region_size" not in doc["array"]["target"]
    assert spec_from_dict(doc) == spec
    given = {"type": kind, "members": members, "region_size": "64KiB"}
    again = spec_from_dict({"array": {"name": "d", "target": given}})
    assert again.target.region_size == 64 << 10  # type: ignore[union-attr]
    assert spec_to_dict(again)["array"]["target"]["region_size"] == 64 << 10


def test_generated_names_avoid_explicit_ones() -> None:
    spec = spec_from_dict(
        {
            "array": {
                "name": "d",
                "target": {
                    "type": "mirror",
                    "members": [
                        {"type": "memory", "size": 4096},
                        {"type": "memory", "size": 4096, "name": "node1"},
                    ],
                },
            }
        }
    )
    assert [t.name for t in walk(spec.target)] == ["node0", "node2", "node1"]


def test_linear_parts() -> None:
    spec = spec_from_toml(
        """
[array]
name = "l"
[array.target]
type = "linear"
[[array.target.members]]
type = "memory"
size = "1MiB"
start = "4k"
length = "8k"
[[array.target.members]]
type = "file"
path = "/x"
"""
    )
    assert spec.target == LinearSpec(
        name="node0",
        members=(
            LinearPart(target=MemorySpec(name="node1", size=1 << 20), start=4096, length=8192),
            LinearPart(target=FileSpec(name="node2", path="/x")),
        ),
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse_and_round_trip(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, ArraySpec)
    for human in (False, True):
        doc = spec_to_dict(spec, human=human)
        assert spec_from_dict(doc) == spec
        assert spec_from_dict(json.loads(json.dumps(doc))) == spec


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "mirror.toml",
        "linear.toml",
        "stripe.toml",
        "nested.toml",
    }


def test_round_trip_base() -> None:
    spec = spec_from_toml(BASE)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec_to_dict(spec_from_dict(spec_to_dict(spec))) == spec_to_dict(spec)


def test_remote_uri_is_an_address() -> None:
    doc = {"type": "remote", "uri": "nbd+unix:///a%20b?socket=/run/x%20y.sock"}
    node = target_from_dict(doc)
    assert node == RemoteSpec(name="node0", uri=Address(path="/run/x y.sock", export="a b"))
    assert target_from_dict(target_to_dict(node)) == node
    with pytest.raises(SpecError) as e:
        target_from_dict({"type": "remote", "uri": "127.0.0.1:10809"})
    assert e.value.key == "spec.uri" and "not an NBD URI" in e.value.reason


def test_target_from_dict_for_add() -> None:
    node = target_from_dict({"type": "memory", "size": "1MiB"}, taken={"node0", "node1", "x"})
    assert node == MemorySpec(name="node3", size=1 << 20)
    with pytest.raises(SpecError) as e:
        target_from_dict({"type": "memory", "size": 1, "name": "x"}, taken={"x"})
    assert e.value.key == "spec.name"
    part = linear_part_from_dict({"type": "memory", "size": 8192, "start": 4096}, taken=())
    assert part == LinearPart(target=MemorySpec(name="node0", size=8192), start=4096)


# -- errors with key path and line ----------------------------------------------------


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        spec_from_toml(text, filename="demo.toml")
    return e.value


def _line_of(text: str, needle: str, nth: int = 0) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return lines[nth]


@pytest.mark.parametrize(
    ("old", "new", "key", "reason", "nth"),
    [
        (
            'uri = "nbd://127.0.0.1:10810/"',
            'uri = "http://x"',
            "array.target.members[0].uri",
            "not an NBD URI: 'http://x'",
            0,
        ),
        (
            'uri = "nbd://127.0.0.1:10810/"',
            'uri = "nbd://h:99999/"',
            "array.target.members[0].uri",
            "port must be",
            0,
        ),
        (
            'uri = "nbd://127.0.0.1:10810/"',
            "uri = 5",
            "array.target.members[0].uri",
            "expected a string, got integer 5",
            0,
        ),
        (
            'chunk_size = "64KiB"',
            'chunk_sise = "64KiB"',
            "array.target.members[1].chunk_sise",
            "unknown key",
            0,
        ),
        (
            'chunk_size = "64KiB"',
            'chunk_size = "3KiB"',
            "array.target.members[1].chunk_size",
            "power of two",
            0,
        ),
        (
            'chunk_size = "64KiB"',
            'chunk_size = "96KiB"',
            "array.target.members[1].chunk_size",
            "power of two",
            0,
        ),
        (
            'size = "1GiB"',
            'size = "1 gigabyte"',
            "array.target.members[1].members[1].size",
            "not a size",
            1,
        ),
        (
            'size = "1GiB"',
            "size = true",
            "array.target.members[1].members[0].size",
            "not a size",
            0,
        ),
        (
            'region_size = "64KiB"',
            "region_size = 1000",
            "array.target.region_size",
            "power of two",
            0,
        ),
        ('io_timeout = "30s"', 'io_timeout = "soon"', "array.io_timeout", "not a duration", 0),
        ('name = "demo"', 'name = "no spaces"', "array.name", "bad name", 0),
        (
            'name = "node-a"',
            'name = "node-a"\nread_only = true',
            "array.target.members[0].read_only",
            "unknown key",
            0,
        ),
        (
            'type = "remote"',
            'type = "raid7"',
            "array.target.members[0].type",
            "unknown type 'raid7'",
            0,
        ),
        (
            'listen = ["127.0.0.1:10809",',
            'listen = ["127.0.0.1",',
            "array.listen[0]",
            "missing :port",
            0,
        ),
        ('listen = ["127.0.0.1:10809",', "listen = [1,", "array.listen[0]", "expected a string", 0),
    ],
)
def test_bad_value(old: str, new: str, key: str, reason: str, nth: int) -> None:
    parts = BASE.split(old)
    assert len(parts) >= 2, old
    text = old.join(parts[: nth + 1]) + new + old.join(parts[nth + 1 :])
    err = _error(text)
    assert err.key == key
    assert reason in err.reason
    assert err.line == _line_of(text, new.splitlines()[-1])
    assert str(err) == f"demo.toml:{err.line}: {key}: {err.reason}"


def test_missing_key_reported_at_its_table() -> None:
    text = BASE.replace('uri = "nbd://127.0.0.1:10810/"\n', "")
    err = _error(text)
    assert (err.key, err.reason) == ("array.target.members[0].uri", "missing required key")
    assert err.line == _line_of(text, "[[array.target.members]]", 0)


def test_missing_array_name() -> None:
    err = _error(BASE.replace('name = "demo"\n', ""))
    assert (err.key, err.line) == ("array.name", 1)


def test_missing_target() -> None:
    err = spec_from_dict_error({"array": {"name": "x"}})
    assert err.key == "array.target"


def spec_from_dict_error(doc: object) -> SpecError:
    with pytest.raises(SpecError) as e:
        spec_from_dict(doc)  # type: ignore[arg-type]
    return e.value


def test_unknown_top_level_key() -> None:
    text = BASE + "\n[arrray]\nname = 'x'\n"
    err = _error(text)
    assert err.key == "arrray"
    assert err.line == _line_of(text, "[arrray]")


def test_typo_is_unknown_not_missing() -> None:
    text = BASE.replace("uri = ", "uir = ")
    err = _error(text)
    assert err.key == "array.target.members[0].uir"
    assert err.reason == "unknown key (did you mean 'uri'?)"
    assert err.line == _line_of(text, "uir = ")
    err = _error(BASE.replace("[array]", "[arrray]"))
    assert (err.key, err.line, err.reason) == ("arrray", 1, "unknown key (did you mean 'array'?)")


def test_duplicate_names() -> None:
    text = BASE.replace('type = "memory"', 'type = "memory"\n  name = "node-a"')
    err = _error(text)
    assert err.key == "array.target.members[1].members[1].name"
    assert "duplicate node name 'node-a'" in err.reason
    assert err.line == _line_of(text, 'name = "node-a"', 1)


def test_too_few_mirror_legs() -> None:
    text = """\
[array]
name = "m"

[array.target]
type = "mirror"

[[array.target.members]]
type = "memory"
size = "1MiB"
"""
    err = _error(text)
    assert err.key == "array.target.members"
    assert "mirror needs at least 2 members, got 1" in err.reason
    assert err.line == 7


def test_too_few_stripe_members_inline() -> None:
    text = """\
[array]
name = "s"
[array.target]
type = "stripe"
members = [{ type = "memory", size = 4096 }]
"""
    err = _error(text)
    assert (err.key, err.line) == ("array.target.members", 5)


def test_error_inside_multiline_inline_array() -> None:
    text = """\
[array]
name = "s"
[array.target]
type = "stripe"
members = [
  { type = "memory", size = 4096 },
  { type = "memory", size = "lots" },
]
"""
    err = _error(text)
    assert (err.key, err.line) == ("array.target.members[1].size", 7)


def test_linear_keys_only_in_linear() -> None:
    text = BASE.replace('name = "node-a"', 'name = "node-a"\nstart = 0')
    err = _error(text)
    assert (err.key, err.reason) == ("array.target.members[0].start", "unknown key")


def test_wrong_table_types() -> None:
    assert spec_from_dict_error({"array": {"name": "x", "target": "memory"}}).key == "array.target"
    err = spec_from_dict_error(
        {"array": {"name": "x", "target": {"type": "mirror", "members": {}}}}
    )
    assert err.key == "array.target.members"
    err = spec_from_dict_error(
        {"array": {"name": "x", "target": {"type": "linear", "members": [3]}}}
    )
    assert (err.key, err.reason) == ("array.target.members[0]", "expected a table, got integer 3")
    assert spec_from_dict_error([]).key == ""
    assert (
        spec_from_dict_error({"array": {"name": "x", "export": 1, "target": {}}}).key
        == "array.export"
    )


def test_dict_errors_have_no_file() -> None:
    err = spec_from_dict_error({"array": {"name": "x", "target": {"type": "memory"}}})
    assert str(err) == "array.target.size: missing required key"
    assert err.file == "" and err.line is None


def test_syntax_error_has_line() -> None:
    text = BASE.replace('type = "stripe"', 'type = "stripe')
    with pytest.raises(ConfigError) as e:
        spec_from_toml(text, filename="demo.toml")
    assert not isinstance(e.value, SpecError)
    assert e.value.where == f"demo.toml:{_line_of(text, 'type = ' + chr(34) + 'stripe')}"
    assert "TOML syntax error" in str(e.value) and "line" in str(e.value)


def test_locator_ignores_strings_and_comments() -> None:
    text = """\
[array]  # the array
name = "x"   # a [fake] table in a comment
export = "a = [b"
[array.target]
type = "memory"
description = '''
[array.target.bogus]
size = 1
'''
size = 4096
"""
    err = _error(text)
    assert (err.key, err.line) == ("array.target.description", 6)


def test_quoted_keys_are_located() -> None:
    text = '[array]\nname = "x"\n[array.target]\n"type" = "memory"\n"size" = "big"\n'
    err = _error(text)
    assert (err.key, err.line) == ("array.target.size", 5)


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read spec"):
        load_spec(tmp_path / "missing.toml")
    p = tmp_path / "bad.toml"
    p.write_text(BASE.replace('uri = "nbd://127.0.0.1:10810/"', 'uri = "http://x"'))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(e.value).startswith(
        f"{p}:13: array.target.members[0].uri: not an NBD URI: 'http://x'"
    )
