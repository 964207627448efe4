"""The status tree drawn for a terminal (``dst status``, ``dst up``), with rich.

:func:`render_status` turns the status tree the daemon reports
(:mod:`dst.array.daemon` documents its shape) into one table per array: a row per
device, indented by depth, with its state, TLS and counters; under the table the
exports, the clients with their TLS session, and a line for each running resync or
verify (a progress bar) and each leg out of sync with its reason.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dst.units import format_size

STATE_STYLE = {
    "running": "green",
    "connected": "green",
    "in_sync": "green",
    "ok": "green",
    "degraded": "yellow",
    "resyncing": "yellow",
    "stale": "yellow",
    "stopped": "dim",
    "created": "dim",
    "failed": "red",
    "disconnected": "red",
}


def render_status(status: dict[str, Any]) -> Any:
    """A rich renderable of the status tree: one table per array."""
    arrays = status.get("arrays", [])
    if not arrays:
        return Text("no arrays")
    return Group(*(_array_table(a) for a in arrays))


def _array_table(a: dict[str, Any]) -> Any:
    title = Text.assemble(
        (a["name"], "bold"),
        f"  {a['algorithm']}  {format_size(int(a['size']))}  ",
        (a["state"], STATE_STYLE.get(a["state"], "")),
    )
    if a.get("suspended"):
        title.append(f"  suspended ({a.get('held', 0)} held)", style="yellow")
    table = Table(title=title, title_justify="left", expand=False)
    cols = ("node", "type", "where", "start", "size", "state", "tls", "reads", "writes", "errors")
    for col in cols:
        table.add_column(
            col,
            justify="right" if col in ("start", "size", "reads", "writes", "errors") else "left",
        )
    extras: list[Any] = []
    _rows(table, a["root"], 0, extras)
    parts: list[Any] = [table]
    if a.get("exports"):
        parts.append(Text("exports: " + "  ".join(a["exports"]), style="cyan"))
    for c in a.get("clients") or []:
        parts.append(Text(f"client {c['peer']}: {_tls_text(c.get('tls'))}, {c['state']}"))
    parts.extend(extras)
    return Group(*parts)


def _tls_cell(kind: str, state: str, detail: dict[str, Any]) -> str:
    """The tls column: a remote member connection's TLS version (``1.3``) or ``no``."""
    tls = detail.get("tls")
    if isinstance(tls, dict):
        return str(tls.get("version", "TLS")).removeprefix("TLSv")
    down = state in ("stopped", "disconnected", "reconnecting", "failed") or "last_error" in detail
    return "no" if kind == "remote" and not down else ""


def _tls_text(tls: dict[str, Any] | None) -> str:
    """``TLSv1.3 CN=x,O=y`` (the peer's identity), or ``plaintext``."""
    if not tls:
        return "plaintext"
    who = tls.get("peer") or (f"psk {tls['psk']}" if tls.get("psk") else "no certificate")
    return f"{tls.get('version', 'TLS')} {who}"


def _rows(table: Table, node: dict[str, Any], depth: int, extras: list[Any]) -> None:
    c = node.get("counters") or {}
    start = node.get("start")
    state = node["state"]
    detail = node.get("detail") or {}
    tls = detail.get("tls")
    if isinstance(tls, dict):
        extras.append(Text(f"{node['name']}: {_tls_text(tls)}", style="dim"))
    table.add_row(
        "  " * depth + node["name"],
        node["type"],
        node.get("where", ""),
        "" if start is None else format_size(int(start)),
        format_size(int(node["size"])),
        Text(state, style=STATE_STYLE.get(state, "")),
        _tls_cell(node["type"], state, detail),
        f"{c.get('reads', '')}" + (f" ({format_size(c['read_bytes'])})" if c else ""),
        f"{c.get('writes', '')}" + (f" ({format_size(c['write_bytes'])})" if c else ""),
        str(c.get("errors", "")),
    )
    layout = detail.get("layout")
    if isinstance(layout, dict):  # a parity array: its geometry, and what it misses
        line = (f"{node['name']}: {layout['level']} {layout['rotation']}, {layout['members']} "
                f"members ({layout['data']} data + {layout['parity']} parity per stripe), "
                f"chunk {format_size(int(layout['chunk_size']))}")  # fmt: skip
        if detail.get("degraded"):
            line += "; degraded: " + ", ".join(detail["degraded"])
        if detail.get("unsynced_regions"):
            line += f"; {detail['unsynced_regions']} regions' parity to recompute"
        if detail.get("at_risk_regions"):
            line += f"; {detail['at_risk_regions']} regions at risk (started dirty and degraded)"
        extras.append(Text(line, style="yellow" if detail.get("degraded") else ""))
    resync = detail.get("resync")
    if isinstance(resync, dict) and resync.get("state") == "running":
        extras.append(_progress(node["name"], "resync", resync))
    check = (detail.get("keeper") or {}).get("verify")
    if isinstance(check, dict) and check.get("state") == "running":
        extras.append(_progress(node["name"], "verify", check))
    for leg in detail.get("legs", []):
        if leg.get("state") != "in_sync" and leg.get("reason"):
            extras.append(Text(f"{leg['name']}: {leg['state']}: {leg['reason']}", style="yellow"))
    for kid in node.get("members", []):
        _rows(table, kid, depth + 1, extras)


def _progress(name: str, what: str, r: dict[str, Any]) -> Any:
    done, total = int(r.get("regions_done", 0)), int(r.get("regions_total", 1))
    bar = ProgressBar(total=total, completed=done, width=30)
    label = Text(f"{name} {what} {done}/{total} regions ")
    rate = r.get("rate")
    if rate:
        label.append(f"{format_size(int(rate))}/s ")
    eta = r.get("eta")
    if eta is not None:
        label.append(f"ETA {float(eta):.0f}s")
    grid = Table.grid(padding=1)
    grid.add_row(label, bar)
    return grid
