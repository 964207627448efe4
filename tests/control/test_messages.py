"""Control messages: encode/decode round trips and typed errors naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dst.control import messages as m
from dst.control import operations as op
from dst.errors import ControlError


def line(**msg: Any) -> bytes:
    return json.dumps(msg).encode() + b"\n"


EXAMPLES: list[op.Request] = [
    op.Create(spec={"array": {"name": "demo"}}),
    op.Start(array="demo"),
    op.Stop(array="demo"),
    op.Add(array="demo", spec={"type": "memory", "size": "1MiB"}),
    op.Remove(array="demo", node="node3"),
    op.Status(),
    op.Status(array="demo"),
    op.Fail(array="demo", node="a"),
    op.Readd(array="demo", node="a"),
    op.Readd(array="demo", node="a", full=True),
    op.Suspend(array="demo"),
    op.Suspend(array="demo", node="a"),
    op.Resume(array="demo", node="a"),
    op.Replace(array="demo", node="a", spec={"type": "remote", "uri": "nbd://h/"}),
    op.CancelReplace(array="demo"),
    op.Verify(array="demo", repair=True),
    op.Verify(array="demo", repair=True, source="a", mirror="m"),
    op.ResyncRate(array="demo", rate=10 << 20),
    op.ResyncRate(array="demo", rate=10 << 20, min_rate=1 << 20, mirror="m"),
    op.Reload(),
    op.Reload(array="demo"),
    op.Shutdown(),
    op.Events(),
    op.Events(now=True),
]


def test_every_op_has_an_example() -> None:
    assert {type(r) for r in EXAMPLES} == set(op.REQUESTS.values())
    assert set(op.REQUESTS) >= {"create", "start", "stop", "add", "remove", "status", "resync-rate"}


@pytest.mark.parametrize("req", EXAMPLES, ids=lambda r: f"{r.OP}")
def test_request_round_trip(req: op.Request) -> None:
    data = m.encode_request(42, req)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert m.decode_request(data) == (42, req)
    wire = json.loads(data)
    assert wire["v"] == 1 and wire["op"] == req.OP


def test_wire_format() -> None:
    assert json.loads(m.encode_request(7, op.Stop(array="demo"))) == {
        "v": 1,
        "id": 7,
        "op": "stop",
        "args": {"array": "demo"},
    }
    assert json.loads(m.encode_request(1, op.Status()))["args"] == {}


def test_args_may_be_omitted() -> None:
    assert m.decode_request(line(v=1, id=1, op="status")) == (1, op.Status())
    assert m.decode_request(line(v=1, id=1, op="status", args={"array": None})) == (1, op.Status())


def bad(data: bytes | str) -> m.BadRequest:
    with pytest.raises(m.BadRequest) as e:
        m.decode_request(data)
    assert isinstance(e.value, ControlError)
    return e.value


@pytest.mark.parametrize(
    ("data", "code", "field", "rid"),
    [
        (b"{nope", "bad-json", "", None),
        (b"\xff\xfe", "bad-json", "", None),
        (b"[1, 2]", "bad-json", "", None),
        (line(v=1, op="status"), "bad-request", "id", None),
        (line(v=1, id="7", op="status"), "bad-request", "id", None),
        (line(v=1, id=True, op="status"), "bad-request", "id", None),
        (line(v=2, id=3, op="status"), "bad-version", "v", 3),
        (line(id=3, op="status"), "bad-version", "v", 3),
        (line(v=1, id=3), "bad-request", "op", 3),
        (line(v=1, id=3, op="status", args=[]), "bad-request", "args", 3),
        (line(v=1, id=3, op="status", extra=1), "bad-request", "extra", 3),
        (line(v=1, id=3, op="explode"), "unknown-op", "op", 3),
        (line(v=1, id=3, op="start", args={}), "bad-args", "array", 3),
        (line(v=1, id=3, op="start", args={"array": 5}), "bad-args", "array", 3),
        (line(v=1, id=3, op="start", args={"array": ""}), "bad-args", "array", 3),
        (line(v=1, id=3, op="start", args={"array": "a", "force": True}), "bad-args", "force", 3),
        (line(v=1, id=3, op="create", args={"spec": "x.toml"}), "bad-args", "spec", 3),
        (line(v=1, id=3, op="remove", args={"array": "a"}), "bad-args", "node", 3),
        (line(v=1, id=3, op="verify", args={"array": "a", "repair": 1}), "bad-args", "repair", 3),
        (line(v=1, id=3, op="resync-rate", args={"array": "a", "rate": -1}), "bad-args", "rate", 3),
        (
            line(v=1, id=3, op="resync-rate", args={"array": "a", "rate": 1.5}),
            "bad-args",
            "rate",
            3,
        ),
        (
            line(v=1, id=3, op="resync-rate", args={"array": "a", "rate": False}),
            "bad-args",
            "rate",
            3,
        ),
    ],
)
def test_bad_requests(data: bytes, code: str, field: str, rid: int | None) -> None:
    err = bad(data)
    assert (err.code, err.field, err.request_id) == (code, field, rid)
    assert str(err)


def test_bad_args_message_names_op_and_field() -> None:
    err = bad(line(v=1, id=1, op="add", args={"array": "a", "spec": []}))
    assert str(err) == "add: 'spec' must be an object"


def test_response_round_trip() -> None:
    for resp in [
        m.Response(1, {"arrays": [{"name": "demo", "state": "ok"}]}),
        m.Response(2, None),
        m.Response(3, error=m.ErrorInfo("no-such-array", "no array 'x'", "array")),
        m.Response(None, error=m.ErrorInfo("bad-json", "not JSON")),
    ]:
        assert m.decode_response(m.encode_response(resp)) == resp


def test_response_wire_format() -> None:
    err = m.error_response(9, ControlError("no-such-array", "no array 'x'", field="array"))
    assert json.loads(m.encode_response(err)) == {
        "v": 1,
        "id": 9,
        "ok": False,
        "error": {"code": "no-such-array", "message": "no array 'x'", "field": "array"},
    }
    assert json.loads(m.encode_response(m.Response(9, [1]))) == {
        "v": 1,
        "id": 9,
        "ok": True,
        "result": [1],
    }


def test_response_not_jsonable() -> None:
    with pytest.raises((TypeError, ValueError)):
        m.encode_response(m.Response(1, object()))
    with pytest.raises(ValueError):
        m.encode_response(m.Response(1, float("nan")))


@pytest.mark.parametrize(
    "data",
    [
        b"nope",
        b"[]",
        line(v=2, id=1, ok=True, result=1),
        line(v=1, id="x", ok=True),
        line(v=1, id=1, ok=False),
        line(v=1, id=1, ok=False, error={"code": 1, "message": "m"}),
        line(v=1, id=1),
    ],
)
def test_bad_responses(data: bytes) -> None:
    with pytest.raises(ControlError) as e:
        m.decode_response(data)
    assert e.value.code == "bad-response"
