"""Speculative decoding in `mlc serve` (n-gram prompt lookup, or a draft model), measured with `mlc bench serve`:
with and without drafts.

    .venv/bin/python benchmarks/serve_speculative.py [--rounds 2] [--num-prompts 4] [--spec 5] [--dtype bfloat16]
    .venv/bin/python benchmarks/serve_speculative.py --draft-quant int8 [--draft-layers N] --spec 4 ...   # a draft model

Tasks on SmolLM2-135M-Instruct, one request at a time (batch-1 decode, where drafts pay most):
  copy  a copy-heavy task: chat requests "Copy the following text exactly" over paragraphs of mlc's bundled
        eval corpus (mlc/data/corpus/eval.txt), greedy, --output-len tokens (128);
  chat  mlc's bundled chat corpus (`mlc bench serve --dataset chat`), greedy, --output-len tokens;
  json  structured output (--tasks json): extract a record's fields (name, city, email, and its note, a paragraph of
        the eval corpus) into JSON under a json_schema response_format (a grammar), greedy; a request ends when the
        object is complete (or at --output-len tokens).
Draft model mode (--draft-layers N and/or --draft-quant SCHEME): there is no smaller SmolLM2 here, so the draft is
made from SmolLM2 itself: its first N decoder layers with its final norm and head (--draft-layers), and/or quantised
by `mlc quantize --scheme SCHEME --quantize-head` (int8 or int4); the speculative runs add `--draft` to mlc serve.
Each round starts `mlc serve` without and with `--num-speculative-tokens`, in alternating order (the machine's
speed drifts), runs `mlc bench serve --base-url ...` against it, and reads the acceptance rate from the server's
/metrics (vllm:spec_decode_num_accepted_tokens_total / vllm:spec_decode_num_draft_tokens_total). Reported: the
median output tokens/s (prefill included) and TPOT of each, their ratio and the acceptance rate. (That greedy
output is identical with and without drafts is a test: tests/serve/test_speculative.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from served import get, metric_totals  # noqa: E402  (benchmarks/served.py: the script's directory is on the path)

from tests.conftest import smollm2_hf_dir  # noqa: E402


def copy_dataset(path: Path, count: int) -> None:
    paragraphs = [p.strip() for p in (REPO / "mlc/data/corpus/eval.txt").read_text().split("\n\n") if len(p.strip()) > 400]
    with path.open("w") as f:
        for p in paragraphs[:count]:
            f.write(json.dumps({"prompt": f"Copy the following text exactly, word for word:\n\n{p[:700]}"}) + "\n")


JSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "email": {"type": "string"}, "note": {"type": "string"}},
    "required": ["name", "city", "email", "note"],
    "additionalProperties": False,
    # Written as json.dumps writes it (tool calls are forced so too): with free whitespace, SmolLM2-135M fills the
    # object with blank lines.
    "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
}
PEOPLE = [("Maria Lopez", "Valencia"), ("Kenji Sato", "Osaka"), ("Amara Okafor", "Lagos"), ("Lars Nilsson", "Uppsala"),
          ("Priya Raman", "Chennai"), ("Tom Becker", "Leipzig"), ("Ana Souza", "Recife"), ("Omar Haddad", "Amman")]


def json_dataset(path: Path, count: int) -> None:
    """Extraction prompts: a record whose fields go into JSON_SCHEMA, the note copied word for word."""
    paragraphs = [p.strip() for p in (REPO / "mlc/data/corpus/eval.txt").read_text().split("\n\n") if len(p.strip()) > 400]
    with path.open("w") as f:
        for i, p in enumerate(paragraphs[:count]):
            name, city = PEOPLE[i % len(PEOPLE)]
            email = name.lower().replace(" ", ".") + "@example.org"
            note = p[:320].rsplit(" ", 1)[0]
            prompt = (f"Extract the record below into a JSON object with the keys name, city, email and note. Copy each value "
                      f"exactly as it is written.\n\nName: {name}\nCity: {city}\nEmail: {email}\nNote: {note}")
            f.write(json.dumps({"prompt": prompt}) + "\n")


def make_draft(model: Path, args: argparse.Namespace, work: Path) -> Path:
    """SmolLM2's first --draft-layers layers with its final norm and head, quantised by --draft-quant."""
    from mlc.models import load_model, save_model

    draft = model
    if args.draft_layers:
        m = load_model(model)
        m.model.layers = m.model.layers[: args.draft_layers]
        m.config = m.config.with_updates(num_hidden_layers=args.draft_layers)
        draft = save_model(m, work / f"draft-{args.draft_layers}-layers")
    if args.draft_quant:
        out = work / f"draft-{args.draft_quant}"
        subprocess.run([sys.executable, "-m", "mlc", "quantize", str(draft), "--scheme", args.draft_quant, "--quantize-head", "--no-eval", "--out", str(out)],
                       check=True, env={**os.environ, "MLC_RUNS_DIR": str(work / "runs")}, stdout=subprocess.DEVNULL)
        draft = out
    return draft


def measure(model: Path, spec: int, task: str, dataset: Path | None, args: argparse.Namespace, work: Path) -> dict:
    port = 20000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "mlc", "serve", str(model), "--port", str(port), "--dtype", args.dtype, "--kv-cache-memory", "256MiB",
           "--max-model-len", "2048", "--num-speculative-tokens", str(spec)]
    if spec and args.draft is not None:
        cmd += ["--draft", str(args.draft)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MLC_RUNS_DIR": str(work / "runs")}
    server = subprocess.Popen(cmd, stdout=open(work / f"server-{task}-{spec}.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None:
                sys.exit(f"mlc serve exited with {server.returncode}")
            time.sleep(0.3)
        result = work / f"result-{task}-{spec}.json"
        data = ["--dataset", "jsonl", "--dataset-path", str(dataset), "--no-shuffle"] if task != "chat" else ["--dataset", "chat"]
        if task == "json":
            data += ["--extra-body", json.dumps({"response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": JSON_SCHEMA}}})]
        bench = [sys.executable, "-m", "mlc", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "chat", *data,
                 "--num-prompts", str(args.num_prompts), "--max-concurrency", "1", "--output-len", str(args.output_len), "--temperature", "0",
                 "--tokenizer", str(model), "--save-result", str(result), "--seed", "0"]
        subprocess.run(bench, check=True, env=env, stdout=subprocess.DEVNULL)
        m = metric_totals(port)
    finally:
        server.terminate()
        server.wait(timeout=120)
    out = json.loads(result.read_text())
    drafted = m.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
    return {
        "output_throughput": out["output_throughput"], "mean_tpot_ms": out["mean_tpot_ms"],
        "acceptance": m.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) / drafted if drafted else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--spec", type=int, default=5, help="--num-speculative-tokens of the speculative runs.")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--tasks", default="copy,chat", help="Comma-separated: copy, chat, json.")
    ap.add_argument("--threads", type=int, default=None, help="mlc serve --threads (1 on a machine other jobs oversubscribe).")
    ap.add_argument("--draft-layers", type=int, default=0, help="Draft model: SmolLM2's first N layers, final norm and head (0: all).")
    ap.add_argument("--draft-quant", choices=["int8", "int4"], default=None, help="Draft model: quantised (head included) by mlc quantize.")
    args = ap.parse_args()
    model = smollm2_hf_dir()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.draft = make_draft(model, args, work) if args.draft_layers or args.draft_quant else None
        print(json.dumps({"loadavg": Path("/proc/loadavg").read_text().split()[:3], "draft": args.draft and args.draft.name}), flush=True)
        datasets = {"copy": work / "copy.jsonl", "json": work / "json.jsonl", "chat": None}
        copy_dataset(datasets["copy"], args.num_prompts)
        json_dataset(datasets["json"], args.num_prompts)
        for task in args.tasks.split(","):
            dataset = datasets[task]
            runs: dict[int, list[dict]] = {0: [], args.spec: []}
            for r in range(args.rounds):
                for spec in ((0, args.spec) if r % 2 == 0 else (args.spec, 0)):
                    runs[spec].append(measure(model, spec, task, dataset, args, work))
                    x = runs[spec][-1]
                    print(f"{task} round {r} spec {spec}: {x['output_throughput']:.1f} tok/s, TPOT {x['mean_tpot_ms']:.1f} ms, "
                          f"acceptance {x['acceptance']}", flush=True)
            base = statistics.median(x["output_throughput"] for x in runs[0])
            fast = statistics.median(x["output_throughput"] for x in runs[args.spec])
            acc = [x["acceptance"] for x in runs[args.spec] if x["acceptance"] is not None]
            print(json.dumps({"task": task, "loadavg": Path("/proc/loadavg").read_text().split()[:3], "tokens_per_s_without": base, "tokens_per_s_with": fast, "speedup": fast / base,
                              "tpot_ms_without": statistics.median(x["mean_tpot_ms"] for x in runs[0]),
                              "tpot_ms_with": statistics.median(x["mean_tpot_ms"] for x in runs[args.spec]),
                              "acceptance_rate": statistics.median(acc) if acc else None}), flush=True)


if __name__ == "__main__":
    main()
