"""mlc's tokenizer wrapper and generate() agree with transformers without needing it at run time."""

from __future__ import annotations

import json

import pytest
import torch

from mlc.errors import MlcError
from mlc.models import load_model
from mlc.models.generate import generate
from mlc.models.tokenizer import load_tokenizer

TEXTS = [
    "Hello world",
    "In 1492, Columbus sailed the ocean blue; 3.14159 is pi!\n\tTabs   and  spaces.",
    "naïve café — «quoted» 東京 😀 <|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # square\n",
]

# Exercises what transformers configures: trim_blocks/lstrip_blocks, loop controls, tojson, raise_exception.
TEMPLATE = """{% for m in messages %}
  {% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
  {% if m['role'] == 'skip' %}{% continue %}{% endif %}
<|{{ m['role'] }}|>{{ m['content'] }}{% if m.get('meta') %} {{ m['meta'] | tojson }}{% endif %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def test_encode_and_decode_match_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1


def test_chat_template_renders_as_transformers_renders_it(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((smollm2_dir / name).read_bytes())
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "skip", "content": "never shown"},
        {"role": "user", "content": "Café?", "meta": {"lang": "fr", "n": [1, 2]}},
    ]
    for add in (True, False):
        expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(chat, add_generation_prompt=add) == expected
    assert ours.apply_chat_template(chat, tokenize=True) == theirs.encode(
        theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    with pytest.raises(MlcError, match="system message must come first"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_the_real_chat_template_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    expected = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert load_tokenizer(smollm2_dir).apply_chat_template(chat) == expected


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(tiny_hf_model):
    model = load_model(tiny_hf_model("llama"))
    prompt = [5, 17, 42, 9]
    greedy = generate(model, prompt, 12)
    assert generate(model, prompt, 12, temperature=0.8, top_k=1, seed=1) == greedy
    a = generate(model, prompt, 12, temperature=1.5, seed=7)
    assert a == generate(model, prompt, 12, temperature=1.5, seed=7)
    assert a != generate(model, prompt, 12, temperature=1.5, seed=8)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from mlc.kernels.sampling import SamplingParams, SequenceSampler, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample(logits, [SequenceSampler(SamplingParams(top_p=0.75, seed=s), 4, [])])[0].token for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2 and 3 are never drawn


def test_generation_stops_after_an_eos_token_and_batches_match_single_prompts(tiny_hf_model):
    model = load_model(tiny_hf_model("qwen2"))
    rows = [[3, 4, 5, 6], [60, 61, 62, 63]]
    singles = [generate(model, r, 10)[0] for r in rows]
    assert generate(model, torch.tensor(rows), 10) == singles
    eos = singles[0][3]
    stopped = generate(model, rows[0], 10, eos_token_ids=[eos])[0]
    assert stopped == singles[0][: singles[0].index(eos) + 1]
