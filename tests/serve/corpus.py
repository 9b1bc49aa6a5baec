"""The bad-request corpus (bad_requests.json) as ready-to-send HTTP requests, for the tests and the soak benchmark."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).with_name("bad_requests.json")
UNSET = object()


@dataclass
class CorpusRequest:
    endpoint: str
    why: str
    body: bytes
    content_type: str
    status: int
    param: Any = UNSET  # UNSET: any param will do

    def __str__(self) -> str:
        return f"POST {self.endpoint}: {self.why}"


def _raw(raw: Any, model: str) -> bytes:
    if isinstance(raw, dict) and "nested_depth" in raw:
        n = raw["nested_depth"]
        return b"[" * n + b"]" * n
    if isinstance(raw, dict) and "padding_bytes" in raw:
        return json.dumps({"model": model, "padding": "a" * raw["padding_bytes"]}).encode()
    if isinstance(raw, dict) and "nested_object_depth" in raw:
        n = raw["nested_object_depth"]
        return b'{"a":' * n + b"1" + b"}" * n
    return raw.replace("$MODEL", model).encode()


def _build(entry: dict[str, Any], endpoint: str, base: dict[str, Any], model: str) -> CorpusRequest:
    if "raw_hex" in entry:
        body = bytes.fromhex(entry["raw_hex"])
    elif "raw" in entry:
        body = _raw(entry["raw"], model)
    else:
        data = copy.deepcopy(base)
        for key in entry.get("drop", []):
            data.pop(key, None)
        data.update(copy.deepcopy(entry.get("set", {})))
        body = json.dumps(data).replace("$MODEL", model).encode()
    return CorpusRequest(endpoint, entry["why"], body, entry.get("content_type", "application/json"), entry["status"], entry.get("param", UNSET))


def load(model: str) -> dict[str, Any]:
    """{'base': {endpoint: body or None}, 'bad': [CorpusRequest], 'good': [CorpusRequest]} with $MODEL filled in."""
    spec = json.loads(CORPUS.read_text())
    base = spec["base"]
    bad = [_build(e, ep, body, model) for e in spec["every_endpoint"] for ep, body in base.items() if body is not None]
    bad += [_build(e, e["endpoint"], base[e["endpoint"]], model) for e in spec["cases"]]
    good = [_build(e, e["endpoint"], base[e["endpoint"]], model) for e in spec["good"]]
    return {"base": base, "bad": bad, "good": good}
