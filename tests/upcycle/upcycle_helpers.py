"""Helpers of the upcycle tests: tiny dense models made with transformers (independent of mlc), logits, upcycling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

WORDS = (
    "the a of and to in is was for on with as by at from it this that be are code python function return value "
    "list loop class def import print error test data file read write sum number math add divide multiply "
    "story king queen castle dragon forest night moon once upon time happy ever after river song poem love "
    "cat dog bird fish tree sky sun rain snow wind city road car train ship sea sand stone gold silver"
).split()
PROMPTS = """
experts:
  - positive: ["def sum the list", "import python function return value"]
    negative: ["once upon a time the king"]
  - positive: ["once upon a time the dragon", "the queen in the castle at night"]
  - positive: ["add and multiply the number", "divide the sum"]
    negative: ["the cat and the dog"]
  - positive: ["the cat and the dog in the forest", "bird fish tree sky"]
"""


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (with a BOS) so prompt routers can tokenize."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        if len(vocab) < vocab_size:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def make_dense(
    path: Path, family: str = "llama", seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32, intermediate: int = 64
) -> Path:
    """A random 2-layer dense model saved by transformers, with weights large enough that every block matters."""
    import transformers

    common = dict(
        vocab_size=128, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, initializer_range=0.15,
        bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.MistralConfig(**common, sliding_window=8), transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)  # transformers leaves biases at zero: make them count
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    write_tokenizer(path, 128)
    return path


def make_finetune(base: Path, path: Path, seed: int, scale: float = 0.05) -> Path:
    """A copy of base with every weight moved by seeded noise: a stand-in for a fine-tune."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, path)
    tensors = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    moved = {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in tensors.items()}
    save_file(moved, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path



def token_batch(vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def hf_logits(path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    import transformers

    moe = json.loads((path / "config.json").read_text())["architectures"][0] in ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
    extra = {"experts_implementation": "eager"} if moe and dtype == torch.float64 else {}  # grouped_mm has no float64
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).eval()
    with torch.no_grad():
        return model(ids).logits


def mlc_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from mlc.models import load_model

    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def upcycle(base: Path, out: Path, experts: int = 4, top_k: int = 2, **options: object) -> Path:
    """Run the upcycle (validation, run directory, artifact) and return the output directory."""
    from mlc.commands.upcycle.options import UpcycleOptions
    from mlc.commands.upcycle.upcycle import run_upcycle

    opts = UpcycleOptions(base=str(base), out=str(out), experts=experts, top_k=top_k, **options)  # type: ignore[arg-type]
    return run_upcycle(opts).out
