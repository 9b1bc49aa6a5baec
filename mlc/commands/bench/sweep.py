"""`mlc bench sweep`: every server setting of a grid under every load of a grid, one table, a Pareto plot, an SLO pick.

The server template is a command line with placeholders: `{name}` takes a --grid or --var value as
written, `{name?TEXT}` inserts TEXT when the value is 1/true/yes/on and nothing when it is
0/false/no/off (for flags such as --compile), and `{port}` a free port. Each server setting starts
one server, which then serves each load point in turn (concurrency=, rate=, num_prompts=, input_len=,
output_len=, burstiness=) and is stopped. With SLOs (--slo ttft:MS --slo tpot:MS, e2el too), a point
meets them when the --slo-percentile (default 99) of each metric is within its bound; of those, the
one with the highest goodput (requests/s meeting every SLO; then output tokens/s) is chosen, and the
`mlc bench serve` command line that reproduces it is printed. The k-th load point of each server uses
--seed + k, so no point is served from the prompts cached by the one before. Tokens/s per user on the Pareto plot is
output tokens/s divided by the point's concurrency (its observed peak when it has none), as in vLLM's
`bench sweep plot_pareto`.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, replace
from typing import Any

from mlc.commands.bench.serve import ServeBench
from mlc.errors import MlcUsageError

LOAD_KEYS = {"concurrency", "rate", "num_prompts", "input_len", "output_len", "burstiness"}
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\?([^{}]*))?\}")


def parse_pairs(items: list[str], flag: str, multi: bool) -> dict[str, list[str]]:
    """{'key': [values]} from 'key=v1,v2' items (one value each when not multi)."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",")] if multi else [values.strip()]
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not all(vals):
            raise MlcUsageError(f"bad {flag} {item!r}: expected NAME={'V1,V2,...' if multi else 'VALUE'}", f"e.g. {flag} {'max_running=4,8' if multi else 'model=path/to/model'}")
        if key in out:
            raise MlcUsageError(f"{flag} {key} given twice", "give each name once")
        out[key] = vals
    return out


def fill(template: str, values: dict[str, str]) -> str:
    """The template with its placeholders replaced (see the module docstring)."""
    def one(m: re.Match) -> str:
        name, text = m.group(1), m.group(2)
        value = values[name]
        if text is None:
            return value
        if value.lower() not in TRUE | FALSE:
            raise MlcUsageError(f"{{{name}?...}} needs a yes/no value, not {value!r}", "use 0/1 (or true/false) for it")
        return text if value.lower() in TRUE else ""
    return " ".join(PLACEHOLDER.sub(one, template).split())


@dataclass
class Plan:
    servers: list[dict[str, str]]  # the grid's points (and --var values)
    loads: list[dict[str, str]]


def plan(template: str, grid: dict[str, list[str]], fixed: dict[str, str], load: dict[str, list[str]]) -> Plan:
    """Check that every placeholder is given and every given name is used, then expand the grids."""
    names = {m.group(1) for m in PLACEHOLDER.finditer(template)}
    given = set(grid) | set(fixed) | {"port"}
    if missing := names - given:
        raise MlcUsageError(f"the server template uses {', '.join('{' + n + '}' for n in sorted(missing))} but no --grid or --var gives it", "add --var NAME=VALUE or --grid NAME=V1,V2")
    if unused := (set(grid) | set(fixed)) - names:
        raise MlcUsageError(f"--grid/--var {', '.join(sorted(unused))} is not in the server template", "use it as {NAME} in --server-template, or drop it")
    if both := set(grid) & set(fixed):
        raise MlcUsageError(f"{', '.join(sorted(both))} is both a --grid and a --var", "give it once")
    if "port" not in names:
        raise MlcUsageError("the server template has no {port}", "add --port {port} (each server gets a free port)")
    if bad := set(load) - LOAD_KEYS:
        raise MlcUsageError(f"unknown --load {', '.join(sorted(bad))}", "use " + ", ".join(sorted(LOAD_KEYS)))
    for key, values in load.items():
        for v in values:
            try:
                number = float(v)
            except ValueError:
                number = -1.0
            if not number > 0:
                raise MlcUsageError(f"--load {key}={v} is not a positive number", "e.g. --load concurrency=1,4,16")
    servers = [dict(zip(grid, combo)) | fixed for combo in itertools.product(*grid.values())] or [dict(fixed)]
    loads = [dict(zip(load, combo)) for combo in itertools.product(*load.values())] or [{}]
    for s in servers:
        fill(template, s | {"port": "0"})  # yes/no placeholders with other values fail now, before anything runs
    return Plan(servers, loads)


def point_options(base: ServeBench, load: dict[str, str], command: str, explicit_prompts: int | None, index: int) -> ServeBench:
    """The bench settings of the index-th load point on one server.

    Each point of a server gets the seed --seed + index: new prompts, so a server's prefix cache (mlc serve's,
    vLLM's, llama.cpp's slots) cannot serve one point from the prompts of the one before (vLLM's sweep resets
    vLLM's caches between runs instead, which only works for servers with a reset endpoint).
    """
    seed = base.dataset.seed + index
    concurrency = int(load["concurrency"]) if "concurrency" in load else base.load.max_concurrency
    lo = replace(base.load, max_concurrency=concurrency, seed=seed,
                 request_rate=float(load.get("rate", base.load.request_rate)), burstiness=float(load.get("burstiness", base.load.burstiness)))
    ds = replace(base.dataset, input_len=int(load.get("input_len", base.dataset.input_len)), seed=seed,
                 output_len=int(load["output_len"]) if "output_len" in load else base.dataset.output_len)
    n = int(load["num_prompts"]) if "num_prompts" in load else explicit_prompts or (max(16, 4 * concurrency) if concurrency else 64)
    return replace(base, server=command, load=lo, dataset=ds, num_prompts=n)


def meets(result: dict[str, Any], slos: dict[str, float], percentile: float) -> bool:
    return all(result.get(f"p{percentile:g}_{name}_ms", float("inf")) <= bound for name, bound in slos.items())


def choose(points: list[dict[str, Any]], slos: dict[str, float], percentile: float) -> dict[str, Any] | None:
    """The point meeting every SLO with the highest goodput (then output tokens/s), or None."""
    ok = [p for p in points if p.get("result") and meets(p["result"], slos, percentile)]
    return max(ok, key=lambda p: (p["result"]["request_goodput"] or 0.0, p["result"]["output_throughput"])) if ok else None


def tokens_per_user(p: dict[str, Any]) -> float:
    r = p["result"]
    users = r.get("max_concurrency") or r.get("max_concurrent_requests") or 1
    return r["output_throughput"] / users


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both tokens/s per user and output tokens/s, by tokens/s per user."""
    done = [p for p in points if p.get("result")]
    front = [p for p in done if not any(
        tokens_per_user(q) >= tokens_per_user(p) and q["result"]["output_throughput"] >= p["result"]["output_throughput"]
        and (tokens_per_user(q), q["result"]["output_throughput"]) != (tokens_per_user(p), p["result"]["output_throughput"]) for q in done)]
    return sorted(front, key=tokens_per_user)


def reproduce(p: dict[str, Any], base_args: list[str]) -> str:
    """The `mlc bench serve` command line of one point."""
    opts: ServeBench = p["options"]
    args = ["mlc", "bench", "serve", "--server", opts.server, *base_args, "--seed", str(opts.dataset.seed), "--num-prompts", str(opts.num_prompts)]
    if opts.load.max_concurrency:
        args += ["--max-concurrency", str(opts.load.max_concurrency)]
    if opts.load.request_rate != float("inf"):
        args += ["--request-rate", f"{opts.load.request_rate:g}"]
    if opts.load.burstiness != 1.0:
        args += ["--burstiness", f"{opts.load.burstiness:g}"]
    args += ["--input-len", str(opts.dataset.input_len)] if opts.dataset.name == "random" else []
    args += ["--output-len", str(opts.dataset.output_len)] if opts.dataset.output_len else []
    if opts.slos:
        args += ["--goodput", " ".join(f"{k}:{v:g}" for k, v in opts.slos.items())]
    return shlex.join(args)


def plot_pareto(points: list[dict[str, Any]], chosen: dict[str, Any] | None, path: Any) -> None:
    from mlc.commands.bench.plots import pyplot

    plt = pyplot()
    done = [p for p in points if p.get("result")]
    front = pareto(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([tokens_per_user(p) for p in done], [p["result"]["output_throughput"] for p in done], color="0.6", label="all points")
    for p in done:
        ax.annotate(p["label"], (tokens_per_user(p), p["result"]["output_throughput"]), fontsize=6, alpha=0.7)
    ax.plot([tokens_per_user(p) for p in front], [p["result"]["output_throughput"] for p in front], "o-", label="Pareto front")
    if chosen is not None:
        ax.plot([tokens_per_user(chosen)], [chosen["result"]["output_throughput"]], "*", ms=16, color="tab:red", label="chosen (meets the SLOs)")
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s (aggregate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_args(opts: ServeBench) -> list[str]:
    """The `bench serve` flags shared by every point (the workload and the request fields), for reproduce()."""
    d = opts.dataset
    args = ["--dataset", d.name]
    if d.path:
        args += ["--dataset-path", str(d.path)]
    if opts.endpoint != "completions":
        args += ["--endpoint", opts.endpoint]
    for flag, value, default in (("--model", opts.model, None), ("--tokenizer", opts.tokenizer, None),
                                 ("--range-ratio", d.range_ratio, 0.0), ("--temperature", opts.temperature, None),
                                 ("--num-warmups", opts.load.num_warmups, 0)):
        if value != default:
            args += [flag, str(value)]
    if d.name == "prefix-repetition":
        args += ["--prefix-len", str(d.prefix_len), "--suffix-len", str(d.suffix_len), "--num-prefixes", str(d.num_prefixes)]
    if opts.ignore_eos:
        args.append("--ignore-eos")
    return args


def run_sweep(base: ServeBench, template: str, the_plan: Plan, percentile: float, explicit_prompts: int | None, run: Any) -> list[dict[str, Any]]:
    """Every server setting under every load; a server that fails to start marks its points failed and the sweep goes on."""
    from mlc import console
    from mlc.commands.bench.datasets import load_samples
    from mlc.commands.bench.serve import _headers, measure, prepare
    from mlc.commands.bench.server import ManagedServer
    from mlc.errors import MlcError

    points: list[dict[str, Any]] = []
    recorded: dict[str | None, Any] = {}
    total = len(the_plan.servers) * len(the_plan.loads)
    for i, params in enumerate(the_plan.servers):
        command = fill(template, params | {"port": "{port}"})
        opts = replace(base, server=command)
        server_label = " ".join(f"{k}={v}" for k, v in params.items() if k in the_plan.servers[0] and len({s[k] for s in the_plan.servers}) > 1)
        group = [{"label": " ".join(x for x in (server_label, " ".join(f"{k}={v}" for k, v in load.items())) if x) or "default",
                  "server_params": params, "load_params": load, "options": point_options(opts, load, command, explicit_prompts, k),
                  "result": None, "error": None} for k, load in enumerate(the_plan.loads)]
        points += group
        try:
            key = opts.model_ref or command
            if key not in recorded:
                recorded[key] = prepare(opts, run, role="model")
            tok, model_ref = recorded[key]
            for p in group:  # a bad dataset or length fails before the server starts
                load_samples(p["options"].dataset, 1, tok, chat=opts.endpoint == "chat")
            managed = ManagedServer.start(command, None, run.root, run.path / f"server-{i}.log")
            run.log(f"started server {i}: {managed.describe()}")
            try:
                seconds = managed.wait_healthy(_headers(opts), opts.server_timeout)
                console.info(f"sweep: server {i + 1}/{len(the_plan.servers)} ({server_label or command}) healthy after {seconds:.1f}s")
                for n, p in enumerate(group):
                    done = sum(q["result"] is not None or q["error"] is not None for q in points) + 1
                    console.info(f"sweep: point {done}/{total}: {p['label']}")
                    try:
                        result = measure(p["options"], managed.base_url, tok, managed, model_ref, run, cold_start=n == 0, show_progress=False)
                    except MlcError as e:
                        p["error"] = e.one_line()
                        console.warn(f"{p['label']}: {p['error']}")
                        continue
                    result.pop("_detailed"), result.pop("_origin")
                    p["result"] = result
            finally:
                managed.stop()
        except MlcError as e:
            for p in group:
                p["error"] = p["error"] or e.one_line()
            console.warn(f"server {i + 1} ({command}): {e.one_line()}")
    return points


def table(points: list[dict[str, Any]], slos: dict[str, float], percentile: float, chosen: dict[str, Any] | None) -> Any:
    from rich.table import Table

    p = f"p{percentile:g}"
    t = Table("point", "req/s", "out tok/s", "tok/s/user", f"TTFT {p} ms", f"TPOT {p} ms", "goodput req/s", "SLOs", title="mlc bench sweep", title_justify="left")
    for q in points:
        if q["result"] is None:
            t.add_row(q["label"], "[red]failed[/red]", "", "", "", "", "", (q["error"] or "")[:60])
            continue
        r = q["result"]
        ok = meets(r, slos, percentile) if slos else None
        mark = "" if ok is None else ("[bold green]chosen[/bold green]" if q is chosen else "met" if ok else "[red]missed[/red]")
        t.add_row(q["label"], f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}", f"{tokens_per_user(q):.1f}",
                  f"{r[f'{p}_ttft_ms']:.0f}", f"{r[f'{p}_tpot_ms']:.1f}", "" if r["request_goodput"] is None else f"{r['request_goodput']:.2f}", mark)
    return t


def summary(points: list[dict[str, Any]], chosen: dict[str, Any] | None, base_args: list[str], slos: dict[str, float], percentile: float) -> dict[str, Any]:
    """The sweep as JSON: each point's settings and result, the Pareto front, the chosen point and its command."""
    def view(p: dict[str, Any]) -> dict[str, Any]:
        return {"label": p["label"], "server_params": p["server_params"], "load_params": p["load_params"], "command": reproduce(p, base_args),
                "error": p["error"], "tokens_per_user": tokens_per_user(p) if p["result"] else None, "result": p["result"]}

    return {
        "slos": slos, "slo_percentile": percentile,
        "points": [view(p) for p in points],
        "pareto": [p["label"] for p in pareto(points)],
        "chosen": view(chosen) if chosen else None,
    }
