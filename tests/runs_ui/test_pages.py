"""`mlc runs ui`'s pages on a small runs root: what each shows, checked against the files the runs wrote."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from mlc.runs.catalog import Catalog
from mlc.runs.graph import lineage_graph
from tests.runs_ui.conftest import write_json


class Elements(HTMLParser):
    """Every start tag with its attributes (the DOM's elements, in order)."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def test_the_runs_table_lists_every_run_with_its_figures_and_filters(client, chain):
    page = client.get("/")
    assert page.status_code == 200
    rows = Elements(page.text).find("tr")
    listed = [r["data-run"] for r in rows if "data-run" in r]
    assert set(listed) == {chain.prepare, chain.train, chain.quantize, chain.other}
    started = [r.split("-")[0] + r.split("-")[1] for r in listed]
    assert started == sorted(started, reverse=True)  # newest first (ids begin with the start time)
    assert "final_loss" in page.text and "2.05" in page.text
    only_train = client.get("/", params={"command": "train"})
    assert [r["data-run"] for r in Elements(only_train.text).find("tr") if "data-run" in r] == [chain.train]
    by_text = client.get("/", params={"q": "quantize"})
    assert [r["data-run"] for r in Elements(by_text.text).find("tr") if "data-run" in r] == [chain.quantize]
    assert 'http-equiv="refresh"' not in page.text  # nothing is running


def test_a_run_page_draws_each_metric_through_the_logged_points(client, chain):
    page = client.get(f"/runs/{chain.train}")
    assert page.status_code == 200
    dom = Elements(page.text)
    loss = [c for c in dom.find("circle") if c.get("data-y") and float(c["data-y"]) in chain.losses]
    assert [(float(c["data-x"]), float(c["data-y"])) for c in loss] == [(10.0 * (i + 1), v) for i, v in enumerate(chain.losses)]
    assert {s["data-title"] for s in dom.find("svg", data_kind="curve")} == {"loss", "lr"}
    # inputs with their hashes and producer, the artifact with its lineage link, the log escaped
    assert chain.prepare in page.text and "sha256:" in page.text
    assert f"/runs/{chain.train}/lineage?artifact=model" in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>" not in page.text


def test_runs_overlaid_on_one_chart_keep_their_own_points(client, chain, runs_root):
    from mlc.runs import open_run

    with open_run("train", runs_root=runs_root) as again:
        for step, loss in ((10, 5.0), (20, 4.0), (30, 3.5)):
            again.log_metrics({"step": step, "loss": loss})
    page = client.get(f"/runs/{chain.train}", params={"compare": again.id})
    loss_chart = re.search(r'<svg[^>]*data-title="loss".*?</svg>', page.text, re.S).group(0)
    series = Elements(loss_chart).find("g")
    assert sorted(int(g["data-points"]) for g in series if "data-points" in g) == [3, 5]
    curves = client.get("/curves", params=[("run", chain.train), ("run", again.id)])
    assert curves.status_code == 200 and curves.text.count('data-title="loss"') == 1


def test_the_lineage_graph_reaches_back_to_the_data_and_forward_to_what_was_made(client, chain):
    graph = lineage_graph(Catalog(chain.root).records(), chain.train)
    assert set(graph.nodes) >= {f"run:{chain.prepare}", f"art:{chain.prepare}/tokens", f"run:{chain.train}", f"art:{chain.train}/model", f"run:{chain.quantize}"}
    files = [n for n in graph.nodes.values() if n.kind == "file"]
    assert [f.detail["path"] for f in files] == [str(chain.data)]
    assert f"run:{chain.other}" not in graph.nodes
    assert (f"art:{chain.prepare}/tokens", f"run:{chain.train}", "train-data") in graph.edges
    assert (f"art:{chain.train}/model", f"run:{chain.quantize}", "model") in graph.edges
    # from the quantised model, forward is empty and back reaches the data
    back = lineage_graph(Catalog(chain.root).records(), chain.quantize, "model")
    assert back.focus == f"art:{chain.quantize}/model" and f"file:{files[0].detail['hash']}" in back.nodes
    page = client.get(f"/runs/{chain.train}/lineage")
    dom = Elements(page.text)
    assert len(dom.find("g", data_node=f"run:{chain.quantize}")) == 1 and len(dom.find("path")) >= len(graph.edges)


def test_a_running_run_refreshes_its_pages(client, chain, runs_root):
    from mlc.runs.rundir import Run

    live = Run.create(runs_root, "train", ["mlc", "train"])  # holds its lock: really running
    try:
        assert 'http-equiv="refresh"' in client.get("/").text
        assert 'http-equiv="refresh"' in client.get(f"/runs/{live.id}").text
        assert 'http-equiv="refresh"' not in client.get(f"/runs/{chain.train}").text
    finally:
        live.finish("completed", 0)


def test_result_views_read_what_the_commands_write(client, chain, runs_root):
    run = chain.root / chain.quantize
    write_json(run / "report.json", {"scheme": "mixed", "quality": {"perplexity_before": 10.0, "perplexity_after": 10.5, "perplexity_increase_pct": 5.0, "tokens": 99},
                                     "bits_per_param_quantized_layers": 5.5, "bits_per_param_overall": 6.1, "size_bytes": 2e6, "original_size_bytes": 8e6,
                                     "size_ratio": 0.25, "layers_quantized": 2, "quantize_seconds": 1.0, "plan": {"layers_per_setting": {"int8": 1, "int4-g32": 1}},
                                     "worst_layers": [{"name": "model.layers.0.mlp.up_proj", "setting": "int4-g32", "relative_error": 0.1}]})
    write_json(run / "artifacts" / "model" / "config.json", {"quantization_config": {"config_groups": {
        "group_0": {"targets": [r"re:^model\.layers\.1\.mlp\.up_proj$"], "weights": {"num_bits": 8, "type": "int", "group_size": None}},
        "group_1": {"targets": [r"re:^model\.layers\.0\.mlp\.up_proj$"], "weights": {"num_bits": 4, "type": "int", "group_size": 32}}}}})
    page = client.get(f"/runs/{chain.quantize}")
    assert 'data-view="quantize"' in page.text and "10.5" in page.text
    layer_rows = re.findall(r"<tr><td>(model\.layers\.\d\.mlp\.up_proj)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page.text)
    assert layer_rows[:2] == [("model.layers.0.mlp.up_proj", "int4-g32", "4.0"), ("model.layers.1.mlp.up_proj", "int8", "8.0")]


def test_a_result_file_of_the_wrong_shape_is_reported_not_fatal(client, chain):
    write_json(chain.root / chain.quantize / "report.json", {"scheme": "x", "quality": "not a dict", "worst_layers": 3})
    write_json(chain.root / chain.other / "artifacts" / "result" / "result.json", {"per_request": [{"success": True, "start": "x"}, 5]})
    write_json(chain.root / chain.other / "artifacts" / "sweep" / "sweep.json", {"points": [{"result": {"output_throughput": None}}], "chosen": 3})
    (chain.root / chain.train / "metrics.jsonl").open("a").write('{"step": 60, "loss": NaN}\nnot json\n{"step": 70, "moe/expert_share": "x"}\n')
    for run_id in (chain.quantize, chain.other, chain.train):
        page = client.get(f"/runs/{run_id}")
        assert page.status_code == 200, page.text[-2000:]
