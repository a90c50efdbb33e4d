"""Quantization combined with pruning (the paper's Table 5), through bitsandbytes 4-bit NF4.

bitsandbytes >= 0.45 runs NF4 on CPU as well as on GPU, through transformers' `BitsAndBytesConfig`, so one code path
serves both. Transformers applies a quantization config only while loading, so an in-memory (possibly pruned) model
is saved to a temporary folder and loaded back quantized.

Two orders are compared: quantize -> score -> prune (Block Influence measured on the quantized model) and
score -> prune -> quantize; the report shows whether quantization changed which layers were chosen.
"""
from __future__ import annotations

import copy
import tempfile
from typing import Optional

import torch
from torch import nn

from .perplexity import EvaluationError, perplexity

METHODS = ("nf4",)


def _bnb_config(method: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if method not in METHODS:
        raise EvaluationError(f"unknown quantization {method!r}; this build supports {', '.join(METHODS)} "
                              "(bitsandbytes 4-bit); torchao int4 weight-only is not wired in yet")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EvaluationError("--quantize nf4 needs bitsandbytes >= 0.45 (CPU or GPU); run: pip install "
                              "'shortgpt-fast[quantize]'") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=compute_dtype)


def quantize(model: nn.Module, method: str = "nf4", device: Optional[str] = None) -> nn.Module:
    """A 4-bit copy of `model` (every linear layer but the output head becomes a bitsandbytes Linear4bit)."""
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    device = device or str(param.device)
    config = _bnb_config(method, param.dtype if param.dtype != torch.float16 else torch.float16)
    with tempfile.TemporaryDirectory(prefix="shortgpt-quant-") as tmp:
        model.save_pretrained(tmp)
        try:
            quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, device_map=device,
                                                             dtype=param.dtype)
        except (RuntimeError, ValueError, ImportError) as err:
            raise EvaluationError(f"bitsandbytes cannot quantize to {method} on {device}: "
                                  f"{str(err).splitlines()[0]}; try --device cuda, or evaluate without --quantize") \
                from None
    return quantized.eval()


def four_bit_modules(model: nn.Module) -> list[str]:
    import bitsandbytes as bnb

    return [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed 4-bit weights count as their uint8 storage)."""
    return int(model.get_memory_footprint())


def _measure(model: nn.Module, heldout: torch.Tensor, window: int) -> dict:
    from ..models.architectures import find_block_stack

    return {"perplexity": perplexity(model, heldout, window=min(window, heldout.numel()),
                                     stride=max(1, min(window, heldout.numel()) // 2))["ppl"],
            "bytes": model_bytes(model), "layers": len(find_block_stack(model).blocks)}


def quantization_order(model: nn.Module, tokenizer, *, remove: int, method: str = "nf4", metric: str = "bi",
                       calib=None, samples: int = 32, seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                       ppl_tokens: int = 4096, ppl_window: int = 256, log=print) -> dict:
    """Run both orders on `model` (left unchanged) and report perplexity on the calibration text's held-out tail,
    model size and the removed layers of each, beside the dense and the float-pruned model."""
    from ..api import score
    from ..data.calibration import heldout_tokens, read_documents
    from ..surgery.in_memory import prune_model

    docs, _ = read_documents(calib)
    heldout = heldout_tokens(tokenizer, docs)[:ppl_tokens]
    score_kwargs = dict(tokenizer=tokenizer, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                        progress=False)

    log("scoring the float model")
    float_scores = score(model, calib, **score_kwargs)
    float_layers = float_scores.select(metric, remove)
    dense = _measure(model, heldout, ppl_window)
    pruned_float = prune_model(copy.deepcopy(model), float_layers)
    float_pruned = dict(_measure(pruned_float, heldout, ppl_window), removed=float_layers)

    log(f"order 1: quantize ({method}) -> score -> prune")
    quantized = quantize(model, method)
    quantized_dense = _measure(quantized, heldout, ppl_window)
    q_scores = score(quantized, calib, **score_kwargs)
    q_layers = q_scores.select(metric, remove)
    first = prune_model(quantized, q_layers)
    quantize_first = dict(_measure(first, heldout, ppl_window), removed=q_layers,
                          four_bit_modules=len(four_bit_modules(first)))
    del first, quantized

    log(f"order 2: score -> prune -> quantize ({method})")
    second = quantize(pruned_float, method)
    prune_first = dict(_measure(second, heldout, ppl_window), removed=float_layers,
                       four_bit_modules=len(four_bit_modules(second)))
    del second, pruned_float

    return {"method": method, "library": "bitsandbytes", "metric": metric, "remove": remove,
            "heldout_tokens": int(heldout.numel()), "dense": dense, "dense_quantized": quantized_dense,
            "pruned_float": float_pruned, "quantize_score_prune": quantize_first,
            "score_prune_quantize": prune_first, "same_layers": sorted(q_layers) == sorted(float_layers),
            "bi_float": [float(v) for v in float_scores.bi], "bi_quantized": [float(v) for v in q_scores.bi]}


def format_order_table(report: dict) -> str:
    rows = [("dense (float)", report["dense"], None), (f"dense ({report['method']})", report["dense_quantized"], None),
            ("score -> prune (float)", report["pruned_float"], report["pruned_float"]["removed"]),
            ("quantize -> score -> prune", report["quantize_score_prune"], report["quantize_score_prune"]["removed"]),
            ("score -> prune -> quantize", report["score_prune_quantize"], report["score_prune_quantize"]["removed"])]
    out = ["| model | layers | perplexity | size (MB) | removed |", "|---|---:|---:|---:|---|"]
    for label, r, removed in rows:
        out.append(f"| {label} | {r['layers']} | {r['perplexity']:.3f} | {r['bytes'] / 1e6:.2f} | "
                   f"{', '.join(map(str, removed)) if removed is not None else ''} |")
    return "\n".join(out)
