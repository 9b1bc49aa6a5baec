"""Quality and KV memory of `mlc serve --kv-policy h2o|scope --kv-budget N` next to full attention, on SmolLM2-135M.

Everything runs through mlc's serving engine in this process (the paged cache, chunked prefill, the eviction itself),
one engine per setting, on texts from mlc's bundled corpus:

- perplexity: --docs passages of eval.txt, each --prompt-len tokens of prompt, then --continuation-len tokens scored
  teacher-forced: the engine computes each next-token distribution over its (evicted) cache as when generating, but the
  next token is the text's own (ForcedEngine below replaces only the sampler). Perplexity = exp(mean NLL) over all the
  continuations' tokens. SCOPE evicts only generated tokens' entries, so this is where its decode budget shows.
- needle in a haystack: a pass-key sentence ("The pass key is 58213. Remember it. 58213 is the pass key.") inserted
  at several depths of about --haystack-len tokens of train.txt paragraphs, then "Quiz: what is the pass key? Answer: the pass
  key is"; greedy, 8 tokens; retrieved when the key appears in the output. The prompt is the long part here, so this is
  where h2o's eviction of prompt entries shows (scope keeps every prompt entry).
- KV memory: the most blocks any one sequence held during a step (after the scheduler reserved its step's blocks,
  before eviction) times the bytes of a block across all layers, and the blocks it held at its last step.

    nice -n 10 .venv/bin/python benchmarks/kv_eviction_quality.py [--budgets 128 256 512 1024] [--dtype float32]

Prints a markdown table (the full-attention row first).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from mlc.kernels.paged_attention import PagedKVStore  # noqa: E402
from mlc.kernels.sampling import SampleResult, SamplingParams  # noqa: E402
from mlc.models import load_model  # noqa: E402
from mlc.models.tokenizer import load_tokenizer  # noqa: E402
from tests.conftest import smollm2_hf_dir  # noqa: E402

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# The wording that SmolLM2-135M answers at full attention (12/12 at 1,000 tokens; "What is the pass key? The pass key is"
# without the quiz framing got 3/9 at 500).
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the pass key.\n\n"
QUESTION = "\n\nQuiz: what is the pass key? Answer: the pass key is"


class ForcedEngine(Engine):
    """The serving engine with the text's own next token in place of a sampled one (teacher forcing).

    Only the token choice differs: scheduling, the paged cache and eviction are the engine's. Each token's SampleResult
    carries the log-probability the model gave it.
    """

    def __init__(self, *args, forced: dict[str, list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.forced = forced

    def _sample(self, logits, seqs):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for row, seq in zip(logprobs, seqs):
            token = self.forced[seq.owner.request.request_id][len(seq.owner.output)]
            out.append(SampleResult(token, float(row[token])))
        return out


def track_blocks(engine: Engine) -> tuple[dict[int, int], dict[int, int]]:
    """({seq id: most blocks held in a step}, {seq id: blocks held in its last step}), filled as the engine runs."""
    peak: dict[int, int] = {}
    last: dict[int, int] = {}
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        for seq, _ in plan:
            peak[seq.seq_id] = max(peak.get(seq.seq_id, 0), len(seq.blocks))
            last[seq.seq_id] = len(seq.blocks)
        return plan

    engine.scheduler.schedule = spy
    return peak, last


def make_engine(model, tokenizer, args, policy: str, budget: int, num_blocks: int, forced=None) -> Engine:
    config = EngineConfig(num_blocks, args.block_size, args.max_batched_tokens, max_model_len=model.config.max_position_embeddings,
                          enable_prefix_caching=False, kv_policy=policy, kv_budget=budget)
    if forced is not None:
        return ForcedEngine(model, tokenizer, config, forced=forced)
    return Engine(model, tokenizer, config)


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[SampleResult]]:
    out: dict[str, list[SampleResult]] = {r.request_id: [] for r in requests}
    text: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def sink(ev):
        out[ev.request_id].extend(ev.logprobs)
        text[ev.request_id].extend(ev.token_ids)
        if ev.error:
            raise SystemExit(f"request {ev.request_id} failed: {ev.error}")

    for r in requests:
        engine.submit(r, sink)
    with torch.inference_mode():
        engine.run_until_idle()
    run.tokens = text
    return out


def perplexity_texts(tokenizer, args) -> list[list[int]]:
    text = (REPO / "mlc/data/corpus/eval.txt").read_text()
    ids = tokenizer.encode(text)
    need = args.prompt_len + args.continuation_len
    step = max(need, (len(ids) - need) // max(1, args.docs - 1))
    docs = [ids[i : i + need] for i in range(0, len(ids) - need + 1, step)][: args.docs]
    if len(docs) < args.docs:
        raise SystemExit(f"eval.txt has {len(ids)} tokens: too few for {args.docs} passages of {need}")
    return docs


def needle_prompts(tokenizer, args) -> list[tuple[str, list[int]]]:
    """[(key, prompt ids)] for each depth and key."""
    paragraphs = [p.strip() for p in (REPO / "mlc/data/corpus/train.txt").read_text().split("\n\n") if len(p.strip()) > 200]
    rng = random.Random(0)
    out = []
    for k in range(args.keys):
        rng.shuffle(paragraphs)
        hay, size = [], 0
        for p in paragraphs:
            if size >= args.haystack_len:
                break
            hay.append(p)
            size += len(tokenizer.encode(p))
        key = str(rng.randrange(10000, 100000))
        for depth in args.depths:
            at = round(depth * len(hay))
            text = INTRO + "\n\n".join(hay[:at] + [NEEDLE.format(key=key)] + hay[at:]) + QUESTION
            out.append((key, tokenizer.encode(text)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--policies", nargs="+", default=["full", "h2o", "scope"], help="full runs once, the others at each budget.")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--continuation-len", type=int, default=512)
    ap.add_argument("--haystack-len", type=int, default=1000)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_hf_dir()
    model = load_model(path, dtype=None if args.dtype == "float32" else args.dtype)
    tokenizer = load_tokenizer(path)
    mc = model.config
    per_block = PagedKVStore.bytes_per_block(mc.num_hidden_layers, args.block_size, mc.num_key_value_heads, mc.head_dim,
                                             next(model.parameters()).dtype)
    docs = perplexity_texts(tokenizer, args)
    needles = needle_prompts(tokenizer, args)
    longest = max(max(len(d) for d in docs), max(len(p) for _, p in needles) + 8)
    num_blocks = (max(len(docs), len(needles)) + 1) * (-(-longest // args.block_size) + 1)
    print(f"SmolLM2-135M-Instruct ({args.dtype}), perplexity: {len(docs)} x ({args.prompt_len} prompt + {args.continuation_len} scored) "
          f"tokens of eval.txt; needle: {len(needles)} prompts of {min(len(p) for _, p in needles)}-{max(len(p) for _, p in needles)} "
          f"tokens (depths {args.depths}); block {args.block_size}, step budget {args.max_batched_tokens} tokens", file=sys.stderr)
    print("| policy | budget | perplexity | vs full | needle retrieved | peak KV/seq, ppl (MiB) | last-step KV/seq, ppl (MiB) "
          "| peak KV/seq, needle (MiB) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    settings = [("full", 0)] * ("full" in args.policies) + [(p, b) for p in args.policies if p != "full" for b in args.budgets]
    full_ppl = None
    for policy, budget in settings:
        start = time.perf_counter()
        forced = {f"ppl-{i}": d[args.prompt_len :] for i, d in enumerate(docs)}
        engine = make_engine(model, tokenizer, args, policy, budget, num_blocks, forced)
        peak, last = track_blocks(engine)
        requests = [GenerationRequest(f"ppl-{i}", d[: args.prompt_len], SamplingParams(temperature=0), max_tokens=args.continuation_len,
                                      ignore_eos=True) for i, d in enumerate(docs)]
        out = run(engine, requests)
        nll = [-r.logprob for rs in out.values() for r in rs]
        ppl = float(torch.tensor(nll).mean().exp())
        full_ppl = ppl if policy == "full" else full_ppl
        ppl_peak, ppl_last = max(peak.values()) * per_block / 2**20, max(last.values()) * per_block / 2**20

        engine = make_engine(model, tokenizer, args, policy, budget, num_blocks)
        peak, _ = track_blocks(engine)
        requests = [GenerationRequest(f"needle-{i}", p, SamplingParams(temperature=0), max_tokens=8, ignore_eos=True)
                    for i, (_, p) in enumerate(needles)]
        run(engine, requests)
        found = sum(key in tokenizer.decode(run.tokens[f"needle-{i}"]) for i, (key, _) in enumerate(needles))
        ratio = f"{ppl / full_ppl:.3f}x" if full_ppl else "-"
        print(f"| {policy} | {budget or '-'} | {ppl:.3f} | {ratio} | {found}/{len(needles)} | {ppl_peak:.1f} | {ppl_last:.1f} "
              f"| {max(peak.values()) * per_block / 2**20:.1f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
