"""The shipped mergekit-style YAMLs (examples/merge) run as is, and every output tensor matches an
independent float64 computation of the method's formula with the parameters resolved by hand
(gradients, filters and precedence as mergekit defines them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from . import reference as ref
from .tiny import llama_config, llama_tensors, load, perturb, save_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "merge"
VOCAB = [f"t{i}" for i in range(32)]
LAYERS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base and three fine-tunes (math, code, chat) with one tokenizer; models/extended has another."""
    root = tmp_path_factory.mktemp("examples")
    cfg = llama_config(layers=LAYERS)
    base = llama_tensors(cfg, seed=0)
    save_model(root / "models/base", cfg, base, VOCAB)
    for seed, name in enumerate(["math", "code", "chat"], start=1):
        save_model(root / f"models/{name}", cfg, perturb(base, seed), VOCAB)
    # extended: chat's tokens in reverse id order plus four new ones; rows move with their tokens.
    chat = load(root / "models/chat")
    ext = perturb(chat, 9, scale=0.02)
    vocab = VOCAB[::-1] + ["x0", "x1", "x2", "x3"]
    rows = torch.cat([ext["model.embed_tokens.weight"].flip(0), torch.randn(4, cfg["hidden_size"], generator=torch.Generator().manual_seed(5))])
    ext["model.embed_tokens.weight"] = rows
    save_model(root / "models/extended", {**cfg, "vocab_size": len(vocab)}, ext, vocab)
    for f in EXAMPLES.glob("*.yml"):
        shutil.copy(f, root / f.name)
    return root


def run_example(run_mlc, workdir: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    import os

    out = workdir / "out" / f"{name}{'-'.join(extra)}"
    cwd = os.getcwd()
    os.chdir(workdir)  # model paths in the YAMLs are relative to the working directory, as in mergekit
    try:
        code, _, err = run_mlc("merge", f"{name}.yml", "--out", out, "--overwrite", *extra)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    return load(out)


def models(workdir: Path, *names: str) -> list[dict[str, torch.Tensor]]:
    return [{k: v.double() for k, v in load(workdir / "models" / n).items()} for n in names]


def layer_t(name: str) -> float:
    """Relative layer position used by gradients: i/(n-1) in the layer stack, 0 outside it."""
    parts = name.split(".")
    return int(parts[2]) / (LAYERS - 1) if parts[1] == "layers" else 0.0


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name].double(), expected[name], atol=atol), name


def test_linear(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "linear")
    m, c, h = models(workdir, "math", "code", "chat")
    assert_close(got, {k: ref.linear([m[k], c[k], h[k]], [0.5, 0.3, 0.2]) for k in m})


def test_task_arithmetic(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "task_arithmetic")
    b, m, c = models(workdir, "base", "math", "code")
    assert_close(got, {k: ref.task_arithmetic(b[k], [m[k], c[k]], [1.0, 0.5], lam=0.8) for k in b})


def test_ties_with_gradient_and_filtered_weights(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "ties")
    b, m, c, h = models(workdir, "base", "math", "code", "chat")
    expected = {}
    for k in b:
        w_code = 0.2 + 0.6 * layer_t(k)  # [0.2, 0.8] interpolated across the 3 layers
        w_chat = 0.3 if "self_attn" in k else 0.6
        expected[k] = ref.ties(b[k], [m[k], c[k], h[k]], [0.5, w_code, w_chat], [0.5, 0.5, 0.7])
    assert_close(got, expected)


def test_breadcrumbs_global_parameters_apply_to_every_model(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "breadcrumbs")
    b, m, c = models(workdir, "base", "math", "code")
    assert_close(got, {k: ref.breadcrumbs(b[k], [m[k], c[k]], [0.6, 0.4], 0.8, 0.05) for k in b})


def test_slerp_with_per_module_t_gradients(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "slerp")
    b, h = models(workdir, "base", "chat")
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    expected = {}
    for k in b:
        i = int(layer_t(k) * 4)  # 3 layers sample the 5-point gradients at 0, 2, 4
        t = attn[i] if "self_attn" in k else mlp[i] if "mlp" in k else 0.5
        expected[k] = ref.slerp(t, b[k], h[k])
    assert_close(got, expected, atol=1e-5)


def test_model_stock(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "model_stock")
    b, m, c, h = models(workdir, "base", "math", "code", "chat")
    assert_close(got, {k: ref.model_stock(b[k], [m[k], c[k], h[k]]) for k in b}, atol=1e-5)


def test_passthrough_stacks_layers_from_slices(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "passthrough_stack")
    m, c = models(workdir, "math", "code")
    expected = {"model.embed_tokens.weight": m["model.embed_tokens.weight"], "model.norm.weight": c["model.norm.weight"]}
    for out_layer, (src, layer) in enumerate([(m, 0), (m, 1), (c, 1), (c, 2)]):
        for k, v in src.items():
            if k.startswith(f"model.layers.{layer}."):
                expected[k.replace(f"layers.{layer}.", f"layers.{out_layer}.")] = v
    assert_close(got, expected, atol=0)
    config = json.loads((workdir / "out" / "passthrough_stack" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_random_methods_are_reproducible_by_seed(run_mlc, workdir, name):
    a = run_example(run_mlc, workdir, name, "--seed", "1")
    a2 = run_example(run_mlc, workdir, name, "--seed", "1")
    c = run_example(run_mlc, workdir, name, "--seed", "2")
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    (b,) = models(workdir, "base")
    q = "model.layers.1.mlp.up_proj.weight"
    # Roughly the density fraction of entries moved away from the base.
    moved = (a[q].double() != b[q]).double().mean().item()
    assert 0.4 < moved < 0.95


def test_union_tokenizer_reindexes_rows_by_token_and_never_merges_absent_tokens(run_mlc, workdir):
    got = run_example(run_mlc, workdir, "union")
    h, e = models(workdir, "chat", "extended")
    out_dir = workdir / "out" / "union"
    vocab = json.loads((out_dir / "tokenizer.json").read_text())
    ids = {**vocab["model"]["vocab"], **{t["content"]: t["id"] for t in vocab["added_tokens"]}}
    assert len(ids) == 36 and json.loads((out_dir / "config.json").read_text())["vocab_size"] == 36
    emb = got["model.embed_tokens.weight"].double()
    assert emb.shape == (36, 16)
    ext_ids = {t: i for i, t in enumerate(VOCAB[::-1] + ["x0", "x1", "x2", "x3"])}
    for tok, out_id in ids.items():
        if tok.startswith("t"):  # in both models: the average of the two rows for that token
            expected = 0.5 * h["model.embed_tokens.weight"][int(tok[1:])] + 0.5 * e["model.embed_tokens.weight"][ext_ids[tok]]
        else:  # only in extended: its own row exactly, not halved by a zero row from chat
            expected = e["model.embed_tokens.weight"][ext_ids[tok]]
        assert torch.allclose(emb[out_id], expected, atol=1e-6), tok
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[q].double(), 0.5 * h[q] + 0.5 * e[q], atol=1e-6)
    # transformers loads the result: the tokenizer knows the new tokens, the tied model runs.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.convert_tokens_to_ids("x2") == ids["x2"]
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    logits = model(torch.tensor([[ids["x2"], ids["t3"]]])).logits
    assert logits.shape == (1, 2, 36) and torch.isfinite(logits).all()


def test_parameter_precedence_source_over_slice_over_global(run_mlc, workdir):
    """A source's setting beats its slice's, which beats the global one; a filter that does not match falls through."""
    import yaml

    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": "models/math", "layer_range": [0, LAYERS], "parameters": {"weight": 3.0}},
                    {"model": "models/code", "layer_range": [0, LAYERS]},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]},
            }
        ],
        "parameters": {"weight": 1.0},
        "dtype": "float32",
    }
    (workdir / "precedence.yml").write_text(yaml.safe_dump(config))
    got = run_example(run_mlc, workdir, "precedence")
    m, c = models(workdir, "math", "code")
    expected = {k: ref.linear([m[k], c[k]], [3.0, 2.0 if "mlp" in k else 1.0]) for k in m}
    assert_close(got, expected)
