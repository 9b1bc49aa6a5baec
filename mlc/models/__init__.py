"""The native model family (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE) and what runs it.

    build_model(config, seed)            a random model from a ModelConfig or config.json dict
    load_model(path, dtype, device) / save_model(model, out_dir)   HF model directories (quantised ones
                                         through mlc.models.quant_load)
    KVCache, AttentionCache              the contiguous cache and the protocol a paged cache implements
    load_tokenizer(path)                 tokenizers + jinja2 chat templates, no transformers needed
    generate(model, prompt_ids, ...)     greedy or sampled decoding with a KV cache
    perplexity(model, token_ids, ...)    sliding-window perplexity (mlc.models.evaluate)
"""

from mlc.models.config import ModelConfig, config_from_hf, parse_dtype
from mlc.models.kvcache import AttentionCache, KVCache
from mlc.models.load import build_model, load_config, load_model, save_model
from mlc.models.transformer import CausalLM, ModelOutput

__all__ = [
    "AttentionCache",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "config_from_hf",
    "load_config",
    "load_model",
    "parse_dtype",
    "save_model",
]
