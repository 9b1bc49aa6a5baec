"""Speculative decoding of requests with a grammar (response_format json_schema): drafts by n-gram lookup and by a draft
model are proposed under the grammar and checked against the served model's grammar-masked rows, so greedy output is
token for token the output without drafts, every output parses against the schema, a seeded sampled request draws the
same tokens run after run, and a grammar fault de-speculates or fails its own request alone."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from mlc.commands.serve import engine as engine_module
from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.commands.serve.structured import GrammarFactory, GrammarLookahead
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from mlc.models.tokenizer import load_tokenizer

BLOCKS = 160
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"enum": [1, 2, 3]}, "note": {"type": "string", "maxLength": 10}},
    "required": ["city", "days", "note"],
    "additionalProperties": False,
    # One way to write it (as tool calls are forced): a random model would otherwise spend its tokens on blanks.
    "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
# Copy-heavy prompts: records in the output's own form, so n-gram lookup finds what the grammar forces next.
TEXTS = [
    'trips: {"city": "Rome", "days": 2, "note": "warm"}\n{"city": "Oslo", "days": 1, "note": "snow"}\n',
    'one trip: {"city": "Paris", "days": 3, "note": "rain"} and then\n',
    'nothing alike here at all; only words and more words\n',
]


def _byte_level_tokenizer(out, size: int) -> None:
    """A GPT-2 style byte-level BPE of `size` tokens saved in out: printable ASCII, merges of frequent JSON pairs, <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(33, 127)] + ["\u0120"]  # byte-level spelling: a space is \u0120
    pairs = [('"', ":"), ("\u0120", '"'), ("{", '"'), ('"', ","), ('"', "}"), ("a", "n"), ("o", "r"), ("i", "n"), ("e", "s"), ("t", "h"),
             ("e", "r"), ("r", "e"), ("o", "n"), ("a", "t"), ("e", "n"), ("i", "t"), ("a", "r"), ("s", "t"), ("o", "u"), ("e", "d")]
    merges = pairs[: size - len(chars) - 1]
    vocab = {c: i for i, c in enumerate(chars + [a + b for a, b in merges] + ["<eos>"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


def with_byte_level_tokenizer(src, out):
    """A copy of the model directory src with _byte_level_tokenizer of its vocabulary size."""
    shutil.copytree(src, out)
    _byte_level_tokenizer(out, json.loads((out / "config.json").read_text())["vocab_size"])
    return out


@pytest.fixture(scope="module")
def setup(tiny_hf_model, tmp_path_factory):
    """(target, draft that often agrees with it, tokenizer directory, prompts): the tiny llama over a byte-level BPE."""
    out = tmp_path_factory.mktemp("bytes-tokenizer")
    target = load_model(tiny_hf_model("llama"), dtype="float32")  # the one the other speculative tests load
    _byte_level_tokenizer(out, target.config.vocab_size)
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:2]
    draft.config = draft.config.with_updates(num_hidden_layers=2)
    tok = load_tokenizer(out)
    return target, draft, out, [tok.encode(t, add_special_tokens=False) for t in TEXTS]


def run(setup, k: int, params: SamplingParams, draft=None, prompts=None, engine=None) -> tuple[list[list[int]], Engine]:
    target, _, tok_dir, default_prompts = setup
    if engine is None:
        tok = load_tokenizer(tok_dir)
        grammars = GrammarFactory(tok.backend.to_str(), target.config.vocab_size, tok.eos_token_ids)
        config = EngineConfig(num_blocks=BLOCKS, block_size=4, max_batched_tokens=64, speculative_tokens=k)
        engine = Engine(target, tok, config, grammars=grammars, draft=draft)
    grammar = engine.grammars.grammar(FORMAT)
    events: dict[str, list] = {}

    def sink(ev):
        events.setdefault(ev.request_id, []).append(ev)

    prompts = prompts or default_prompts
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), p, params, max_tokens=80, grammar=grammar), sink)
    engine.run_until_idle()
    assert engine.pool.num_free == BLOCKS
    outs = []
    for i in range(len(prompts)):
        evs = events[str(i)]
        assert evs[-1].finish_reason == "stop", evs[-1].error  # the grammar completed
        outs.append([t for ev in evs for t in ev.token_ids])
    return outs, engine


def check_schema(engine: Engine, tokens: list[int]) -> None:
    """The output parses as JSON and follows SCHEMA (checked by hand: the keys, their types and lengths)."""
    text = engine.tokenizer.decode(tokens)
    value = json.loads(text)
    assert list(value) == ["city", "days", "note"], text
    assert isinstance(value["city"], str) and len(value["city"]) <= 8 and value["days"] in (1, 2, 3)
    assert isinstance(value["note"], str) and len(value["note"]) <= 10


def counters(engine: Engine) -> tuple[float, float]:
    m = engine.metrics
    return m.spec_draft_tokens._value.get(), m.spec_accepted_tokens._value.get()


def test_ngram_drafts_are_cut_at_the_grammars_first_refusal_or_replaced_by_the_tokens_it_forces(setup):
    from mlc.commands.serve.engine import _grammar_drafts

    tok = load_tokenizer(setup[2])
    grammars = GrammarFactory(tok.backend.to_str(), setup[0].config.vocab_size, tok.eos_token_ids)
    matcher = grammars.matcher(grammars.grammar(FORMAT))
    ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    matcher.consume_tokens(ids('{"city": "Ro'))
    # "me" fits the string, '", "days": 2, "note' too, but then a fourth key does not.
    assert _grammar_drafts(matcher, ids('me", "days": 2, "city": "'), 12) == ids('me", "days": 2, "')
    matcher.consume_tokens(ids('me"'))
    forced = ids(', "days": ')
    assert _grammar_drafts(matcher, ids(', "note'), 12) == forced[: len(matcher.compute_ff_tokens())]  # more than the lookup's
    assert len(matcher.compute_ff_tokens()) > 2 and _grammar_drafts(matcher, [], 2) == forced[:2]
    assert tok.decode(_grammar_drafts(matcher, ids(', "days": 3, "note": "'), 12)) == ', "days": 3, "note": "'  # the longer


def test_greedy_constrained_output_is_identical_with_ngram_drafts_and_with_a_draft_model(setup):
    target, draft, _, _ = setup
    greedy = SamplingParams(temperature=0)
    plain, engine = run(setup, 0, greedy)
    for tokens in plain:
        check_schema(engine, tokens)
    ngram, engine = run(setup, 4, greedy)
    assert ngram == plain
    drafted, accepted = counters(engine)
    assert 0 < accepted < drafted  # the grammar's forced stretches are copied from the prompt, and some drafts fail
    drafted_model, engine = run(setup, 4, greedy, draft=draft)
    assert drafted_model == plain
    assert counters(engine)[0] > 0
    itself, engine = run(setup, 4, greedy, draft=copy.deepcopy(target))
    assert itself == plain
    drafted, accepted = counters(engine)
    assert accepted == drafted > 20  # a draft that is the target, masked alike, has every draft kept


def test_a_seeded_sampled_constrained_request_draws_the_same_tokens_run_after_run(setup):
    _, draft, _, prompts = setup
    params = SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=0.3, seed=11)
    plain, engine = run(setup, 0, params)
    ngram, _ = run(setup, 4, params)
    assert ngram == plain  # n-gram drafts keep each sequence's own random stream
    alone, _ = run(setup, 3, params, draft=draft, prompts=prompts[:1])
    batched, engine = run(setup, 4, params, draft=draft)
    assert batched[0] == alone[0]  # the draft model's rule: the same tokens whatever shares the batch
    assert counters(engine)[1] > 0
    for tokens in plain + batched:
        check_schema(engine, tokens)


def test_a_grammar_fault_de_speculates_or_fails_only_its_own_request(setup, monkeypatch):
    target, draft, tok_dir, prompts = setup
    greedy = SamplingParams(temperature=0)
    plain, _ = run(setup, 0, greedy)
    tok = load_tokenizer(tok_dir)
    grammars = GrammarFactory(tok.backend.to_str(), target.config.vocab_size, tok.eos_token_ids)
    engine = Engine(target, tok, EngineConfig(num_blocks=BLOCKS, block_size=4, max_batched_tokens=64, speculative_tokens=4),
                    grammars=grammars, draft=draft)
    matchers = []
    factory_matcher = grammars.matcher
    monkeypatch.setattr(grammars, "matcher", lambda g: matchers.append(factory_matcher(g)) or matchers[-1])

    class BrokenForTheFirst(GrammarLookahead):  # the draft side of request 0's grammar fails at its third draft
        def __init__(self, factory, matcher):
            super().__init__(factory, matcher)
            self.broken, self.calls = matcher is matchers[0], 0

        def allowed(self):
            self.calls += 1
            if self.broken and self.calls > 2:
                raise RuntimeError("lookahead broke")
            return super().allowed()

    monkeypatch.setattr(engine_module, "GrammarLookahead", BrokenForTheFirst)
    out, engine = run(setup, 4, greedy, engine=engine)
    assert out == plain  # request 0 lost some drafts, not its output; the others were untouched

    # The request's own matcher failing mid-way (while it checks drafts) fails that request alone.
    allowed, calls = grammars.allowed, []

    def broken_for_the_second(matcher):
        if matcher is matchers[-2]:
            calls.append(1)
            if len(calls) > 4:
                raise RuntimeError("grammar broke")
        return allowed(matcher)

    monkeypatch.setattr(grammars, "allowed", broken_for_the_second)
    events: dict[str, list] = {}
    grammar = grammars.grammar(FORMAT)
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(f"again{i}", p, greedy, max_tokens=80, grammar=grammar), lambda ev: events.setdefault(ev.request_id, []).append(ev))
    engine.run_until_idle()
    assert events["again1"][-1].finish_reason == "error" and "verifying draft tokens: RuntimeError: grammar broke" in events["again1"][-1].error
    for i in (0, 2):
        assert [t for ev in events[f"again{i}"] for t in ev.token_ids] == plain[i]
    assert engine.pool.num_free == BLOCKS

