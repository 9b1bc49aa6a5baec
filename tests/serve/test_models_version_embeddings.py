"""/v1/models/{id}, /version and /v1/embeddings through the official openai client, against transformers' own hidden states."""

from __future__ import annotations

import openai
import pytest
import torch

import mlc
from tests.serve.conftest import TINY_NAME, http

pytestmark = pytest.mark.realmodel

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris", "Serving embeddings from a causal language model."]


@pytest.fixture(scope="module")
def reference(tiny_chat_model):
    """transformers' LlamaModel (no head): last_hidden_state, mean over the tokens, L2-normalised, by hand."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_chat_model, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)

    def embed(text_or_ids):
        ids = tok(text_or_ids, add_special_tokens=False)["input_ids"] if isinstance(text_or_ids, str) else text_or_ids
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0]
        v = h.mean(0)
        return v / v.norm()

    return embed


def test_embeddings_equal_transformers_mean_pooled_normalised_hidden_state(tiny_server, reference):
    client = tiny_server.client()
    got = client.embeddings.create(model=TINY_NAME, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2]
    for text, d in zip(TEXTS, got.data):
        v = torch.tensor(d.embedding)
        assert torch.allclose(v, reference(text), atol=1e-4), text
        assert abs(v.norm().item() - 1) < 1e-5
    as_floats = client.embeddings.create(model=TINY_NAME, input=[[1, 2, 3, 4]], encoding_format="float")
    assert torch.allclose(torch.tensor(as_floats.data[0].embedding), reference([1, 2, 3, 4]), atol=1e-4)
    tokens = sum(http(tiny_server, "POST", "/tokenize", {"prompt": t})[1]["count"] for t in TEXTS)
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens


def test_embeddings_refuse_an_unknown_model_and_a_dimension_they_cannot_give(tiny_server):
    client = tiny_server.client()
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=TINY_NAME, input="x", dimensions=3)
    assert e.value.body["param"] == "dimensions"


def test_a_model_card_by_id_and_the_version(tiny_server):
    client = tiny_server.client()
    card = client.models.retrieve(TINY_NAME)
    assert card.id == TINY_NAME and card.owned_by == "mlc"
    assert card.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/other-model")
    assert e.value.body["code"] == "model_not_found"
    assert http(tiny_server, "GET", "/version", key=None) == (200, {"version": mlc.__version__})
