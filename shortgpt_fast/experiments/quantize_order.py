"""The paper's Table 5 on one model: quantize -> score -> prune against score -> prune -> quantize, at one removal
count, with perplexity on the calibration text's held-out tail, model size and the layers each order removes."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..evaluation.perplexity import perplexity
from ..evaluation.quantize import LIBRARIES, check_method, four_bit_modules, model_bytes, quantize


def _measure(model: nn.Module, heldout: torch.Tensor, window: int) -> dict:
    from ..models.architectures import find_block_stack

    return {"perplexity": perplexity(model, heldout, window=min(window, heldout.numel()),
                                     stride=max(1, min(window, heldout.numel()) // 2))["ppl"],
            "bytes": model_bytes(model), "layers": len(find_block_stack(model).blocks)}


def quantization_order(model: nn.Module, tokenizer, *, remove: int, method: str = "nf4", metric: str = "bi",
                       calib=None, samples: int = 32, seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                       ppl_tokens: Optional[int] = 4096, ppl_window: int = 256, log=print) -> dict:
    """Run both orders on `model` (left unchanged) and report perplexity on the calibration text's held-out tail,
    model size and the removed layers of each, beside the dense and the float-pruned model."""
    from ..api import score
    from ..data.calibration import heldout_tokens, read_documents
    from ..surgery.in_memory import prune_model

    check_method(method)

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

    return {"method": method, "library": LIBRARIES[method], "metric": metric, "remove": remove,
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
