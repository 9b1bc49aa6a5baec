"""What the serve benchmarks ask a running server: a GET, and the totals of its /metrics samples."""

from __future__ import annotations

from http.client import HTTPConnection


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


def metric_totals(port: int) -> dict[str, float]:
    """{sample name: value summed over its labels} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(get(port, "/metrics")[1].decode()):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out
