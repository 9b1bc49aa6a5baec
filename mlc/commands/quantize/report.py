"""The quality report of a quantize run: perplexity before and after, size on disk, bits per parameter, worst layers.

Perplexity uses the shared evaluator (mlc.models.evaluate, what `mlc eval` runs) on the bundled
held-out text. "After" runs the quantised weights exactly (dequantised, fp32 compute, LLM.int8's
activation rounding included), so the figure measures the quantisation, not the bf16 activations
the fast CPU kernels use.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from mlc.commands.quantize.quantize import QuantizeResult

WORST_LAYERS = 5


def dir_bytes(path: Path) -> int:
    """The weights' bytes: safetensors shards, or the GGUF file of --format gguf."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in path.glob(pattern))


def _ppl(model: Any, ids: list[int], context: int, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    from mlc.models.evaluate import perplexity

    r = perplexity(model, ids, context=context, stride=context, progress=progress)
    return {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens}


def evaluate_pair(model_dir: Path, quant_dir: Path, eval_text: Path, context: int,
                  progress: Callable[[str, int, int], None] | None = None, quantized: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Perplexity of the original (fp32) and of the quantised model (exact) on the same tokens.

    quantized() builds the quantised model when it is not an HF directory (a GGUF file's weights).
    """
    from mlc.models import load_model
    from mlc.models.quant_load import load_quantized_model, quant_modules
    from mlc.models.tokenizer import load_tokenizer

    ids = load_tokenizer(model_dir).encode(eval_text.read_text(encoding="utf-8"))
    def tick(what: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(what, done, total)) if progress else None

    model = load_model(model_dir, dtype=torch.float32)
    context = min(context, model.config.max_position_embeddings)
    before = _ppl(model, ids, context, tick("perplexity of the original, windows"))
    del model
    if quantized is not None:
        model = quantized()
    else:
        model = load_quantized_model(quant_dir, dtype=torch.float32)
        for m in quant_modules(model).values():
            m.exact = True
    after = _ppl(model, ids, context, tick("perplexity of the quantised model, windows"))
    return {"eval_text": str(eval_text), "context": context, "tokens": before["tokens"],
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "perplexity_increase_pct": 100.0 * (after["perplexity"] / before["perplexity"] - 1.0)}


def build_report(scheme: str, options: dict[str, Any], model_dir: Path, quant_dir: Path, result: QuantizeResult,
                 total_params: int, quality: dict[str, Any] | None) -> dict[str, Any]:
    quant_params = sum(math.prod(layer.shape) for layer in result.layers)
    quant_bits = sum(layer.bits_per_param * math.prod(layer.shape) for layer in result.layers)
    size, original = dir_bytes(quant_dir), dir_bytes(model_dir)
    worst = sorted(result.layers, key=lambda layer: -layer.relative_error)[:WORST_LAYERS]
    return {
        "scheme": scheme,
        "options": options,
        "layers_quantized": len(result.layers),
        "params_quantized": quant_params,
        "bits_per_param_quantized_layers": round(quant_bits / max(quant_params, 1), 4),
        "bits_per_param_overall": round(size * 8 / max(total_params, 1), 4),
        "size_bytes": size,
        "original_size_bytes": original,
        "size_ratio": round(size / max(original, 1), 4),
        "quantize_seconds": round(result.quantize_seconds, 2),
        "quality": quality,
        "plan": result.plan,
        "worst_layers": [asdict(layer) | {"shape": list(layer.shape)} for layer in worst],
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from mlc import console

    table = Table(title=f"mlc quantize: {report['scheme']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    q = report.get("quality")
    if q:
        table.add_row("perplexity before", f"{q['perplexity_before']:.4f}")
        table.add_row("perplexity after", f"{q['perplexity_after']:.4f} ({q['perplexity_increase_pct']:+.2f}%)")
        table.add_row("eval tokens", str(q["tokens"]))
    table.add_row("size on disk", f"{report['size_bytes'] / 1e6:.1f} MB (from {report['original_size_bytes'] / 1e6:.1f} MB, x{report['size_ratio']:.3f})")
    table.add_row("bits/param, quantised layers", f"{report['bits_per_param_quantized_layers']:.3f}")
    table.add_row("bits/param, whole model", f"{report['bits_per_param_overall']:.3f}")
    table.add_row("layers quantised", str(report["layers_quantized"]))
    if report.get("group_size_chosen"):
        chosen = report["group_size_chosen"]
        table.add_row("group size", f"{chosen['group_size']} ({chosen['why']})")
    table.add_row("quantise time", f"{report['quantize_seconds']:.1f} s")
    plan = report.get("plan") or {}
    if "layers_per_setting" in plan:
        table.add_row("mixed allocation", ", ".join(f"{k}: {v}" for k, v in plan["layers_per_setting"].items()))
    if "smoothed" in plan:  # AWQ: how much the chosen scales cut the Linears' output error below plain rounding
        gains = sorted(v["error_vs_rtn"] for v in plan["smoothed"].values())
        table.add_row("AWQ output error vs RTN", f"median x{gains[len(gains) // 2]:.3f} over {len(gains)} scaled groups")
    if report.get("format") == "gguf":
        what = "llama.cpp's Q4_K_M mix" if report["scheme"] == "q4_k_m" else "Q8_0/Q4_0 blocks of the same integers"
        table.add_row("format", f"GGUF ({what})")
    console.out.print(table)
    worst = Table(title="largest weight errors (||W - Q(W)|| / ||W||)")
    for col in ("layer", "setting", "relative error"):
        worst.add_column(col)
    for layer in report["worst_layers"]:
        worst.add_row(layer["name"], layer["setting"], f"{layer['relative_error']:.4f}")
    console.out.print(worst)
