"""Muon the Moonlight way: which parameters it takes, and the update it makes, checked against an SVD."""

import math

import torch

from mlc.commands.train.config import OptimSection
from mlc.commands.train.optim import build_optimizers
from mlc.models import build_model

TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = build_model(dict(TINY))
    muon, adamw = build_optimizers(model, OptimSection(name="muon"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= on_adamw
    assert on_muon.isdisjoint(on_adamw) and len(on_muon | on_adamw) == len(list(model.parameters()))
    # Weight decay never touches 1-D parameters (norm gains).
    for group in adamw.param_groups:
        if any(p.ndim == 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_first_muon_step_is_the_orthogonalised_gradient_scaled_to_adamw_rms():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 32) * 0.02)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(32, 48, bias=False)
    model.proj.weight = w
    (muon,) = build_optimizers(model, OptimSection(name="muon", lr=0.01, weight_decay=0.1))
    before = w.detach().clone()
    w.grad = torch.randn(48, 32)
    muon.step()
    # Moonlight: W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(A, B)) * O, with O ~ U V^T of the momentum (here: of g).
    o = (before * (1 - 0.01 * 0.1) - w.detach()) / (0.01 * 0.2 * math.sqrt(48))
    u, _, vt = torch.linalg.svd(w.grad, full_matrices=False)
    polar = u @ vt
    cosine = torch.sum(o * polar) / (o.norm() * polar.norm())
    assert cosine > 0.97
    singular = torch.linalg.svdvals(o)
    # Five quintic Newton-Schulz steps put every singular value near 1 (roughly 0.7-1.2), not exactly on it.
    assert 0.6 < singular.min() and singular.max() < 1.3
