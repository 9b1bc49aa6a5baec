"""Half-precision CPU products pad their rows to a bucket (oneDNN keeps a kernel per row count, so a server's RSS grew
with every new step size) and give exactly the unpadded product's rows."""

import torch

from mlc.models import transformer


def test_rows_are_padded_to_a_bucket_and_the_kept_rows_are_bit_identical(monkeypatch):
    torch.manual_seed(0)
    layer = transformer.Linear(96, 160).to(torch.bfloat16)
    seen: list[int] = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real_linear(x, w, b)

    with torch.no_grad():
        for rows in (2, 3, 15, 16, 17, 40):
            x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
            expected = real_linear(x, layer.weight, layer.bias)
            monkeypatch.setattr(torch.nn.functional, "linear", spy)
            got = layer(x)
            monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
            assert got.shape == expected.shape and torch.equal(got, expected), rows
    assert seen == [16, 16, 16, 16, 32, 48]


def test_training_and_fp32_products_are_not_padded(monkeypatch):
    layer = transformer.Linear(8, 4)
    seen: list[int] = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or real_linear(x, w, b))
    layer(torch.randn(3, 8))  # fp32
    layer.to(torch.bfloat16)(torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True))  # autograd
    assert seen == [3, 3]
