"""ModelConfig: the one description of a model, read from and written to a Hugging Face config.json."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from mlc.dtypes import MODEL_DTYPES, dtype_name, parse_dtype
from mlc.errors import InputError

if TYPE_CHECKING:
    from mlc.io.safetensors_reader import ModelTensors

# model_type -> (architecture name, defaults that transformers assumes when config.json leaves a key out)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}),
    "mistral": ("MistralForCausalLM", {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "sliding_window": 4096}),
    "qwen2": ("Qwen2ForCausalLM", {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}),
    "mixtral": ("MixtralForCausalLM", {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}),
}
ARCHITECTURES = {arch: model_type for model_type, (arch, _) in FAMILIES.items()}
SUPPORTED = ", ".join(arch for arch, _ in FAMILIES.values()) + " (SmolLM is LlamaForCausalLM)"
ROPE_TYPES = ("default", "linear", "llama3")

def stored_dtype(tensors: ModelTensors, declared: str | None) -> torch.dtype:
    """The dtype a model's weights are stored in (its embedding's), else config.json's torch_dtype."""
    if "model.embed_tokens.weight" in tensors:
        stored = tensors.info("model.embed_tokens.weight").dtype
        if dtype_name(stored) in MODEL_DTYPES:
            return stored
    return parse_dtype(declared)


@dataclass
class ModelConfig:
    """Every hyper-parameter the native model reads; `extra` keeps the config.json keys it does not."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling with "rope_type" (linear, llama3)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 and Qwen2-MoE; Llama's attention_bias also sets o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" or "sliding_attention"; None = all the same
    # Mixture of experts (mixtral, qwen2_moe); num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # qwen2_moe expert width (Mixtral experts use intermediate_size)
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.001
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return FAMILIES[self.model_type][0]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_sparse(self, i: int) -> bool:
        """Whether decoder layer i holds routed experts (Qwen2-MoE may keep some layers dense)."""
        if not self.is_moe:
            return False
        if self.model_type == "mixtral":
            return True
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def layer_window(self, i: int) -> int | None:
        """The sliding attention window of layer i, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window

    def with_updates(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)

    def to_hf(self) -> dict[str, Any]:
        """A complete config.json that transformers, vLLM and mergekit read as this architecture."""
        out = copy.deepcopy(self.extra)
        for stale in ("rope_parameters", "dtype", "torch_dtype", "transformers_version"):
            out.pop(stale, None)
        out.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=copy.deepcopy(self.rope_scaling),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype=self.torch_dtype,
            use_cache=True,
        )
        out.setdefault("attention_dropout", 0.0)
        family = self.model_type
        if family == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if family in ("mistral", "mixtral"):
            out["sliding_window"] = self.sliding_window
        if family in ("qwen2", "qwen2_moe"):
            out.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window)
            out.setdefault("max_window_layers", self.num_hidden_layers)
            if self.layer_types is not None:
                out["layer_types"] = list(self.layer_types)
        if family == "mixtral":
            out.update(
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                router_jitter_noise=self.router_jitter_noise,
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        if family == "qwen2_moe":
            out.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                qkv_bias=self.qkv_bias,
            )
        return out


def family_of(raw: dict[str, Any]) -> str:
    """The model_type mlc builds for this config.json, or a one-line error naming what is supported."""
    model_type = raw.get("model_type")
    if model_type in FAMILIES:
        return model_type
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    name = archs[0] if archs else model_type or "a config without model_type or architectures"
    raise InputError(f"unsupported architecture {name!r}", f"mlc supports {SUPPORTED}")


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise InputError(f"config.json has no {key!r}", "the model directory's config.json is incomplete")
    return raw[key]


def _rope(raw: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the classic keys or transformers 5's rope_parameters."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling: dict[str, Any] | None = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta") or default_theta)
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    if scaling is not None:
        kind = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        scaling["rope_type"] = kind
        if kind not in ROPE_TYPES:
            raise InputError(f"RoPE scaling {kind!r} is not supported", f"mlc supports rope_type {', '.join(ROPE_TYPES)}")
        if kind == "default":
            scaling = None
    return theta, scaling


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Read a Hugging Face config.json (transformers 4 or 5 style) into a ModelConfig."""
    family = family_of(raw)
    defaults = FAMILIES[family][1]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"activation {act!r} is not supported", "mlc's SwiGLU models use hidden_act 'silu'")
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    theta, scaling = _rope(raw, defaults["rope_theta"])
    sliding = raw.get("sliding_window", defaults.get("sliding_window"))
    if family in ("qwen2", "qwen2_moe") and not raw.get("use_sliding_window"):
        sliding = None
    layer_types = raw.get("layer_types")
    if sliding is not None and family in ("qwen2", "qwen2_moe") and layer_types is None:
        start = raw.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(raw["num_hidden_layers"])]
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    cfg = ModelConfig(
        model_type=family,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_hidden_layers=int(_require(raw, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings") or defaults["max_position_embeddings"]),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
        layer_types=list(layer_types) if layer_types is not None else None,
        initializer_range=float(raw.get("initializer_range", 0.02)),
        torch_dtype=dtype_name(parse_dtype(dtype) or torch.float32),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        extra=copy.deepcopy(raw),
    )
    if family == "llama":
        cfg.qkv_bias = cfg.o_bias = bool(raw.get("attention_bias", False))
        cfg.mlp_bias = bool(raw.get("mlp_bias", False))
    elif family == "qwen2":
        cfg.qkv_bias = True
    elif family == "mixtral":
        cfg.num_experts = int(_require(raw, "num_local_experts"))
        cfg.num_experts_per_tok = int(raw.get("num_experts_per_tok", 2))
        cfg.router_jitter_noise = float(raw.get("router_jitter_noise") or 0.0)
        cfg.router_aux_loss_coef = float(raw.get("router_aux_loss_coef", 0.001))
    elif family == "qwen2_moe":
        cfg.qkv_bias = bool(raw.get("qkv_bias", True))
        cfg.num_experts = int(_require(raw, "num_experts"))
        cfg.num_experts_per_tok = int(raw.get("num_experts_per_tok", 4))
        cfg.moe_intermediate_size = int(_require(raw, "moe_intermediate_size"))
        cfg.shared_expert_intermediate_size = int(raw.get("shared_expert_intermediate_size") or 0)
        cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", False))
        cfg.decoder_sparse_step = int(raw.get("decoder_sparse_step", 1))
        cfg.mlp_only_layers = list(raw.get("mlp_only_layers") or [])
        cfg.router_aux_loss_coef = float(raw.get("router_aux_loss_coef", 0.001))
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {cfg.num_key_value_heads}",
            "fix config.json",
        )
    return cfg
