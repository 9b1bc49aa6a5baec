"""The bundled default data: sizes, held-out eval text, valid chat sets, tokenizer and config agreeing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from mlc import data
from mlc.data import build_tokenizer

TINY = data.tiny_model_dir()
SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
# ChatML written out by hand: the reference the template must reproduce.
CHAT_RENDERED = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if p.strip()}


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _articles(text: str) -> list[str]:
    return text.strip("\n").split("\n\n\n")


def _chats(path: Path) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(list(r) == ["messages"] for r in rows)
    return [r["messages"] for r in rows]


def _json(name: str) -> dict:
    return json.loads((TINY / name).read_text(encoding="utf-8"))


def test_files_exist_with_the_stated_sizes():
    def kb(p):
        return p.stat().st_size / 1000
    assert 150 <= kb(data.corpus_path()) <= 200
    assert 25 <= kb(data.eval_text_path()) <= 30
    assert 280 <= len(_chats(data.chat_train_path())) <= 320
    assert 50 <= len(_chats(data.chat_eval_path())) <= 70
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"]:
        assert (TINY / name).is_file(), name


def test_corpus_is_many_titled_articles_of_several_paragraphs():
    for path, at_least in [(data.corpus_path(), 80), (data.eval_text_path(), 12)]:
        articles = _articles(path.read_text(encoding="utf-8"))
        assert len(articles) >= at_least
        for article in articles:
            title, *paragraphs = article.split("\n\n")
            assert "\n" not in title and len(title) < 80, title
            assert len(paragraphs) >= 3, title


def test_eval_text_is_held_out_from_train():
    train = data.corpus_path().read_text(encoding="utf-8")
    held_out = data.eval_text_path().read_text(encoding="utf-8")
    assert not _paragraphs(train) & _paragraphs(held_out)
    def titles(t):
        return {a.split("\n")[0] for a in _articles(t)}
    assert not titles(train) & titles(held_out)
    # Bound: under 0.5% of eval's 8-word runs may also occur in train (today: none).
    eval_shingles = _shingles(held_out)
    assert len(eval_shingles & _shingles(train)) <= 0.005 * len(eval_shingles)


@pytest.mark.parametrize("path", [data.chat_train_path(), data.chat_eval_path()], ids=["train", "eval"])
def test_every_chat_alternates_user_assistant_and_ends_with_assistant(path: Path):
    for messages in _chats(path):
        roles = [m["role"] for m in messages]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0, roles
        assert all(isinstance(m["content"], str) and m["content"].strip() == m["content"] != "" for m in messages)


def test_chat_eval_prompts_do_not_occur_in_chat_train():
    def prompts(p):
        return {m["content"].lower() for c in _chats(p) for m in c if m["role"] == "user"}
    assert not prompts(data.chat_train_path()) & prompts(data.chat_eval_path())


def test_tokenizer_round_trips_text_exactly_and_has_the_stated_special_ids():
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    assert tok.get_vocab_size() == 2048
    assert {t: tok.token_to_id(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    odd = "Café naïve — “quoted” 😀\n\n\tdouble  spaces  , tabs\r\n3.14159 <|im_end|>"
    for text in [data.corpus_path().read_text(encoding="utf-8"), data.eval_text_path().read_text(encoding="utf-8"), odd]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert (ids[0], ids[-1], ids.count(1) + ids.count(2)) == (1, 2, 2)  # special tokens stay single ids
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # digits split one by one


def test_rebuilding_the_tokenizer_reproduces_the_committed_files(tmp_path: Path):
    build_tokenizer.main(tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name


def test_chat_template_renders_chatml_with_generation_prompt():
    template = _json("tokenizer_config.json")["chat_template"]
    # transformers renders chat templates in this environment.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    def render(**kw):
        return env.from_string(template).render(**kw)
    assert render(messages=CHAT, add_generation_prompt=False) == CHAT_RENDERED
    assert render(messages=CHAT[1:2], add_generation_prompt=True) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_config_and_model_config_agree_with_the_tokenizer():
    tok_cfg, special_map = _json("tokenizer_config.json"), _json("special_tokens_map.json")
    config, generation = _json("config.json"), _json("generation_config.json")
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["bos_token"] == tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|endoftext|>"
    assert special_map["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert tok_cfg["model_max_length"] == config["max_position_embeddings"] == 512
    assert config["vocab_size"] == Tokenizer.from_file(str(TINY / "tokenizer.json")).get_vocab_size()
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == SPECIAL_IDS["<|endoftext|>"]
    assert generation["eos_token_id"] == [SPECIAL_IDS["<|endoftext|>"], SPECIAL_IDS["<|im_end|>"]]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    shape = {k: config[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]}
    assert shape == {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert config["tie_word_embeddings"] is True


def test_importing_mlc_data_stays_light():
    code = "import sys, mlc.data; print(sorted(m for m in ('torch', 'tokenizers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_transformers_loads_the_tokenizer_and_builds_the_tiny_llama():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(TINY)
    text = data.eval_text_path().read_text(encoding="utf-8")
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 0)
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHAT_RENDERED
    assert tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(TINY))
    assert type(model).__name__ == "LlamaForCausalLM"
    # By hand: tied embedding 2048*128; per layer q,o 128*128, k,v 128*64, MLP 3*128*384, two norms 128; final norm.
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384 + 2 * 128
    assert sum(p.numel() for p in model.parameters()) == 2048 * 128 + 4 * per_layer + 128
