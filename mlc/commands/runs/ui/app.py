"""`mlc runs ui`'s web app: server-rendered pages over a runs root, read-only.

Safety: only GET routes; a run is found by the exact name of its directory in the runs root's listing (no path
is ever built from the URL); the one static file is named in code; Host headers other than the bound address
are refused (a web page cannot reach this server through DNS rebinding); every response forbids scripts, frames
and foreign resources. Bad run ids and query strings get 404/422 pages.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mlc.commands.runs.ui import lineage_svg, views
from mlc.runs.catalog import Catalog, Damaged, log_tail
from mlc.runs.graph import lineage_graph
from mlc.runs.record import RunRecord

REFRESH_S = 5
KEY_FIGURES = (
    "final_loss", "eval_ppl", "median_tokens_per_s", "world_size", "perplexity", "perplexity_before", "perplexity_after", "bits_per_param",
    "scheme", "method", "best_macro_loss", "output_throughput", "mean_ttft_ms", "mean_tpot_ms", "request_goodput", "points", "chosen",
    "experts", "top_k", "generation_tokens", "tensors_changed", "seconds",
)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
MAX_COMPARE = 12
STATUSES = ("running", "completed", "failed", "interrupted")


def create_app(root: Path, allowed_hosts: list[str] | None = None) -> FastAPI:
    catalog = Catalog(root)
    lock = threading.Lock()  # pages are served from a thread pool; the catalog's cache is rebuilt by one at a time
    env = Environment(loader=PackageLoader("mlc.commands.runs.ui", "templates"), autoescape=True, undefined=StrictUndefined)
    env.filters["short"] = short_id
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str, sort_keys=False)
    env.globals["root"] = str(catalog.root)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "[::1]"])

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(template: str, http_status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**context), status_code=http_status)

    def scan() -> list[RunRecord | Damaged]:
        with lock:
            return catalog.scan()

    def records() -> list[RunRecord]:
        return [r for r in scan() if isinstance(r, RunRecord)]

    def get_run(run_id: str) -> RunRecord:
        items = {r.id if isinstance(r, RunRecord) else r.id: r for r in scan()}
        found = items.get(run_id)
        if found is None:
            raise HTTPException(404, f"no run {run_id!r} under this runs root")
        if isinstance(found, Damaged):
            raise HTTPException(422, f"run {run_id!r} cannot be read: {found.error}")
        return found

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> HTMLResponse:
        return page("error.html", exc.status_code, refresh=None, code=exc.status_code, message=str(exc.detail), title="error")

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError) -> HTMLResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return page("error.html", 422, refresh=None, code=422, message=f"bad request: {problems}", title="error")

    @app.get("/static/style.css")
    def style() -> Response:
        css = resources.files("mlc.commands.runs.ui").joinpath("static/style.css").read_text(encoding="utf-8")
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=300"})

    @app.get("/", response_class=HTMLResponse)
    def runs_table(
        command: str = Query("", max_length=200), status: str = Query("", max_length=20), q: str = Query("", max_length=200),
        limit: int = Query(500, ge=1, le=100_000),
    ) -> HTMLResponse:
        everything = scan()
        ok = [r for r in everything if isinstance(r, RunRecord)]
        shown = [r for r in ok if (not command or r.command == command) and (not status or r.status == status)
                 and (not q or q.lower() in (r.id + " " + " ".join(map(str, r.data.get("argv") or []))).lower())]
        running = sum(r.status == "running" for r in shown)
        return page("runs.html", title="runs", rows=[row(r) for r in shown[:limit]], total=len(shown), limit=limit,
                    damaged=[d for d in everything if isinstance(d, Damaged)], commands=sorted({r.command for r in ok}), statuses=STATUSES,
                    command=command, status=status, q=q, refresh=REFRESH_S if running else None, running=running)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str, compare: list[str] = Query([], max_length=MAX_COMPARE)) -> HTMLResponse:
        record = get_run(run_id)
        others = [get_run(c) for c in dict.fromkeys(compare) if c != run_id]
        all_records = records()
        same = [r for r in all_records if r.command == record.command and r.id != record.id][:30]
        users = lambda r: [u for u in all_records if any(i.get("producer_run") == r.id for i in _inputs(u))]  # noqa: E731
        d = record.data
        return page(
            "run.html", title=f"{record.command} {short_id(record.id)}", r=row(record), d=d, argv=shlex.join(map(str, d.get("argv") or [])),
            inputs=_inputs(record), artifacts=_artifacts(record), summary=d.get("summary") if isinstance(d.get("summary"), dict) else {},
            config=d.get("config"), versions=d.get("versions") if isinstance(d.get("versions"), dict) else {},
            curves=views.curves([record, *others]), sections=views.sections(record, others, users), log=log_tail(record),
            same=same, compare=[o.id for o in others], refresh=REFRESH_S if record.status == "running" else None,
        )

    @app.get("/runs/{run_id}/lineage", response_class=HTMLResponse)
    def lineage_page(run_id: str, artifact: str = Query("", max_length=200)) -> HTMLResponse:
        record = get_run(run_id)
        if artifact and artifact not in _artifacts(record):
            raise HTTPException(404, f"run {run_id!r} has no artifact {artifact!r}")
        graph = lineage_graph(records(), record.id, artifact or None)
        nodes = sorted(graph.nodes.values(), key=lambda n: (n.kind, n.label))
        return page("lineage.html", refresh=None, title=f"lineage of {record.command} {short_id(record.id)}", r=row(record), artifact=artifact,
                    svg=lineage_svg.draw(graph), nodes=nodes, edges=len(graph.edges))

    @app.get("/curves", response_class=HTMLResponse)
    def curves_page(run: list[str] = Query([], max_length=MAX_COMPARE)) -> HTMLResponse:
        chosen = [get_run(r) for r in dict.fromkeys(run)]
        if not chosen:
            raise HTTPException(400, "choose at least one run (the check boxes on the runs table)")
        return page("curves.html", refresh=None, title="curves", runs=[row(r) for r in chosen], curves=views.curves(chosen))

    return app


def _inputs(record: RunRecord) -> list[dict[str, Any]]:
    items = record.data.get("inputs")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _artifacts(record: RunRecord) -> dict[str, dict[str, Any]]:
    items = record.data.get("artifacts")
    return {str(k): v for k, v in items.items() if isinstance(v, dict)} if isinstance(items, dict) else {}


def short_id(run_id: str) -> str:
    return str(run_id).rsplit("-", 1)[-1]


def row(r: RunRecord) -> dict[str, Any]:
    """One line of the runs table: the record's fields people scan for."""
    d = r.data
    summary = d.get("summary") if isinstance(d.get("summary"), dict) else {}
    figures = [(k, views.fmt_value(summary[k], 4)) for k in KEY_FIGURES if isinstance(summary.get(k), (int, float, str)) and not isinstance(summary.get(k), bool)]
    return {"id": r.id, "short": short_id(r.id), "command": r.command, "status": r.status, "started": str(d.get("started") or ""),
            "duration": duration(d.get("started"), d.get("ended"), r.status), "figures": figures[:4], "error": d.get("error"),
            "artifacts": list(_artifacts(r))}


def duration(started: Any, ended: Any, status: str) -> str:
    try:
        t0 = dt.datetime.fromisoformat(str(started))
        t1 = dt.datetime.fromisoformat(str(ended)) if ended else dt.datetime.now(t0.tzinfo) if status == "running" else None
    except (TypeError, ValueError):
        return ""
    if t1 is None:
        return ""
    s = max(0, int((t1 - t0).total_seconds()))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
