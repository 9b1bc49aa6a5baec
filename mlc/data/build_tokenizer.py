"""Rebuild the tiny demo tokenizer in mlc/data/tiny/ from corpus/train.txt.

Run: python -m mlc.data.build_tokenizer
Byte-level BPE with 2048 tokens, so the demo model's embedding stays small and it trains in
seconds. The output is deterministic: running it again rewrites the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).parent
VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 512
# Order fixes the ids: <|endoftext|> = 0 (bos, eos and pad), <|im_start|> = 1, <|im_end|> = 2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML as in SmolLM2-Instruct, minus its injected default system prompt. Plain Jinja (no
# {% generation %} tags) so it renders with jinja2 alone, without transformers.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(corpus: Path) -> Tokenizer:
    """Gives back a byte-level BPE tokenizer trained on `corpus`."""
    tok = Tokenizer(models.BPE())
    # Single digits, as SmolLM2 does: numbers split the same way wherever they appear.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    return tok


def hf_files(tok: Tokenizer) -> dict[str, dict]:
    """Gives back the Hugging Face side files (tokenizer_config.json, special_tokens_map.json)."""
    eos = SPECIAL_TOKENS[0]
    special = {"bos_token": eos, "eos_token": eos, "pad_token": eos, "additional_special_tokens": SPECIAL_TOKENS[1:]}
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        **special,
        "chat_template": CHAT_TEMPLATE,
        # False keeps decode(encode(text)) == text: no space removal before punctuation.
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def main(out_dir: Path = HERE / "tiny") -> None:
    tok = train_tokenizer(HERE / "corpus" / "train.txt")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    for name, obj in hf_files(tok).items():
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_dir} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
