"""`mlc runs ui` in a real browser: Debian's chromium, driven by Playwright, on the runs root `mlc demo` made.

The demo's runs (shared with tests/core/test_demo.py) are joined by the result kinds the demo does not make: a
mixed-precision quantisation, a merge search and a bench sweep (over the scripted token server of tests/bench).
Every page is loaded; the curves, result views and lineage graph must be in the DOM with their points and
nodes, their screenshots must hold a drawing (not a blank box), and the browser must log no error.
Screenshots are kept in pytest's temporary directory (printed at the end), never in the repository.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _start(root: Path, *args: object, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlc", "--runs-dir", str(root), *map(str, args), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def _run_id(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)["run"]


@pytest.fixture(scope="module")
def ui_root(demo_runs: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The demo's runs root plus three runs of the kinds it lacks; returns (root, run id by stage name)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (.ci/run installs it: apt-get install chromium)")
    root, proc = demo_runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    ids = {s["name"]: s["run_id"] for s in summary["stages"]}
    work, extra = Path(summary["work"]), tmp_path_factory.mktemp("ui-runs")
    corpus = REPO / "mlc" / "data" / "corpus"
    text = (corpus / "eval.txt").read_text()
    (extra / "a.txt").write_text(text[:1200])  # two short objectives: the search's cost is evaluating them per trial
    (extra / "b.txt").write_text(text[-1200:])
    prompts = extra / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello", "bees", "honey")))
    server = f"{sys.executable} -m tests.bench.scripted_server {{port}} --ttft 5 --itl {{itl}}"
    started = {  # at once: each is mostly a process start and a small model
        "mixed": _start(root, "quantize", work / "merged", "--scheme", "mixed", "--target-bits", "6", "--samples", "4", "--seq-len", "64",
                        "--no-eval", "--out", extra / "mixed"),
        "search": _start(root, "merge", "search", f"run:{ids['base']}", f"run:{ids['chat']}", "--objective", f"a={extra / 'a.txt'}",
                         "--objective", f"b={extra / 'b.txt'}", "--trials", "2", "--context", "64", "--out", extra / "searched"),
        "sweep": _start(root, "bench", "sweep", "--server-template", server, "--grid", "itl=1,4", "--load", "concurrency=1,2",
                        "--dataset", "jsonl", "--dataset-path", prompts, "--output-len", "3", "--slo", "tpot:3", cwd=REPO),
    }
    ids.update({name: _run_id(proc) for name, proc in started.items()})
    return root, ids


@pytest.fixture(scope="module")
def ui_url(ui_root: tuple[Path, dict[str, str]]):
    root, _ = ui_root
    proc = subprocess.Popen([sys.executable, "-m", "mlc", "--runs-dir", str(root), "runs", "ui", "--port", "0"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        line = proc.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline, "the UI did not answer within 30 s"
                time.sleep(0.1)
        yield url.rstrip("/")
    finally:
        proc.terminate()
        proc.wait(10)


def drawn(png: bytes) -> tuple[int, float]:
    """(distinct colours, fraction of pixels that are not the background) of a screenshot."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []  # [(count, colour)]; the most frequent is the background
    return len(colours), 1 - (max(colours)[0] / (img.width * img.height) if colours else 1)


def test_every_page_renders_in_chromium_with_its_charts_and_graph(ui_url, ui_root, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    root, ids = ui_root
    shots = tmp_path_factory.mktemp("runs-ui-screenshots")
    errors: list[str] = []
    all_runs = sorted(p.name for p in root.iterdir() if (p / "run.json").is_file())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(f"{page.url}: console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"{page.url}: request failed {r.url}"))

        def visit(path: str, name: str) -> None:
            response = page.goto(ui_url + path)
            assert response is not None and response.status == 200, (path, response and response.status)
            page.screenshot(path=str(shots / f"{name}.png"))

        def chart(selector: str, name: str) -> None:
            """The first element matching selector is laid out, and its screenshot shows a drawing."""
            element = page.locator(selector).first
            box = element.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 80, (selector, box)
            png = element.screenshot(path=str(shots / f"{name}.png"))
            colours, ink = drawn(png)
            assert colours >= 4 and ink > 0.02, (selector, colours, ink)

        visit("/", "runs")
        assert page.locator("tr[data-run]").count() == len(all_runs)
        for run_id in all_runs:
            visit(f"/runs/{run_id}", f"run-{run_id}")
            visit(f"/runs/{run_id}/lineage", f"lineage-{run_id}")

        visit(f"/runs/{ids['base']}", "curves-base")  # loss, lr, grad norm, tokens/s against step
        titles = page.locator("svg.chart[data-kind=curve]").evaluate_all("els => els.map(e => e.dataset.title)")
        assert {"loss", "lr", "tokens_per_s"} <= set(titles)
        losses = [json.loads(line)["loss"] for line in (root / ids["base"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        drawn_losses = page.locator("svg.chart[data-title=loss] circle").evaluate_all("els => els.map(e => Number(e.dataset.y))")
        assert drawn_losses == pytest.approx(losses)
        chart("svg.chart[data-title=loss]", "chart-loss")

        visit(f"/curves?run={ids['base']}&run={ids['chat']}", "overlay")  # two training runs on one chart
        assert page.locator("svg.chart[data-title=loss] g.series").count() == 2

        visit(f"/runs/{ids['quantize']}/lineage?artifact=model", "lineage-quantized")
        nodes = page.locator("svg.lineage g.node").evaluate_all("els => els.map(e => e.dataset.node)")
        for stage in ("base", "chat", "merge", "quantize", "serve", "bench"):  # back to training, forward to serving and bench
            assert f"run:{ids[stage]}" in nodes, stage
        assert any(n.startswith("file:") for n in nodes)  # the corpus the base model was trained on
        assert page.locator("svg.lineage path.edge").count() >= len(nodes) - 1
        chart("svg.lineage", "graph")

        views = {"quantize": ("mixed", "svg.chart[data-kind=layers]"), "merge-search": ("search", "svg.chart[data-kind=pareto]"),
                 "bench": ("bench", "svg.chart[data-kind=cdf]"), "sweep": ("sweep", "svg.chart[data-kind=sweep]"),
                 "experts": ("moe-train", "svg.chart[data-kind=experts]")}
        for view, (stage, selector) in views.items():
            visit(f"/runs/{ids[stage]}", f"view-{view}")
            assert page.locator(f"section[data-view={view}]").count() == 1, view
            chart(selector, f"chart-{view}")
        visit(f"/runs/{ids['bench']}", "bench")
        assert page.locator("svg.chart[data-kind=cdf]").count() == 4
        assert page.locator("svg.chart[data-kind=timeline] g.request").count() == 8  # the demo's 8 requests
        visit(f"/runs/{ids['upcycle']}", "upcycle")  # the upcycled model's expert use, measured by the run that trained it
        assert page.locator("section[data-view=experts]").count() == 1
        browser.close()
    print(f"screenshots of mlc runs ui: {shots}")
    assert errors == []
