"""Scrape a ``/metrics`` endpoint and look samples up by name and labels."""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of the Prometheus text format ``text``."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(url: str, *, context: ssl.SSLContext | None = None, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
        body: bytes = r.read()
    return body.decode()


async def scrape(url: str, *, context: ssl.SSLContext | None = None) -> Samples:
    """GET ``url`` from a thread (the server may run on this event loop) and parse it."""
    return parse(await asyncio.to_thread(get, url, context=context))


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; KeyError naming what is there."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        near = [dict(lv) for n, lv in samples if n == name]
        raise KeyError(f"no {name}{labels}; there are {near[:10]}")
    return samples[key]


def matching(
    samples: Samples, name: str, **labels: str
) -> Mapping[frozenset[tuple[str, str]], float]:
    """Every sample ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lv: v for (n, lv), v in samples.items() if n == name and want <= lv}
