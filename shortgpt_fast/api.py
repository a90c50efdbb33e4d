"""The typed Python API that mirrors the CLI; this is what other tools embed."""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .data import calibration
from .data.calibration import CalibrationSet
from .models.loading import DEFAULT_MODEL, DTYPES, load_model
from .scoring.block_influence import collect_layer_stats
from .scoring.report import Scores
from .surgery.in_memory import prune_model

CalibrationSource = Union[None, str, torch.Tensor, CalibrationSet]


def load(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32", device_map=None):
    """(model, tokenizer) for a checkpoint folder, hub id or alias such as 'smollm2-135m'.

    device_map (accelerate's, e.g. "auto") spreads one model over several GPUs instead of placing it on `device`.
    """
    net, tokenizer, _ = load_model(model, device=device, dtype=dtype, device_map=device_map)
    return net, tokenizer


def calibration_set(
    data: CalibrationSource,
    tokenizer=None,
    *,
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    padding: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    text_field: str = "text",
) -> CalibrationSet:
    """Tokenized calibration sequences from a source (see `--calib`) or from tensors.

    padding=None packs text into full windows; padding='left'/'right' draws variable-length padded sequences.
    """
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, torch.Tensor):
        return calibration.from_tensors(data, attention_mask)
    if tokenizer is None:
        raise calibration.CalibrationError("text calibration data needs a tokenizer; pass tokenizer=")
    docs, name = calibration.read_documents(data, text_field=text_field)
    if padding is None:
        calib = calibration.packed(tokenizer, docs, samples, seq_len, seed)
    else:
        calib = calibration.padded(tokenizer, docs, samples, seq_len, seed, padding_side=padding)
    calib.description["source"] = name
    return calib


def score(
    model: Union[str, nn.Module],
    data: CalibrationSource = None,
    *,
    tokenizer=None,
    samples: int = 32,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    padding: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    angular_span: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    text_field: str = "text",
    progress: bool = True,
    streamed: Optional[bool] = None,
    activation_budget: Optional[int] = None,
    device_map=None,
) -> Scores:
    """Score every block of `model` on calibration `data`; returns per-layer metrics, CIs and rankings.

    streamed=True scores a checkpoint folder or alias one block at a time (models larger than memory); None lets a
    path stream when its estimated size exceeds free memory, and prints the estimate. Under torch.distributed the
    calibration sequences are shared across ranks and gathered back, so every rank returns the full Scores.
    """
    from .scoring.distributed import scored_in_shares

    timings = {}
    started = time.perf_counter()
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    if not isinstance(model, str) and streamed:
        raise ValueError("streamed scoring reads the checkpoint itself; pass the model as a path or alias")
    if device_map is not None and streamed:
        raise ValueError("device_map spreads a loaded model over GPUs; streamed scoring loads one block at a time")
    if isinstance(model, str) and streamed is None and device_map is None:
        from .scoring.streamed import streaming_decision

        streamed, estimate = streaming_decision(model, dtype, device)
        if streamed:
            print(f"shortgpt-fast: {estimate}", file=sys.stderr)
    streaming_info = {}
    if isinstance(model, str) and streamed:
        from .scoring.streamed import collect_layer_stats_streamed

        if tokenizer is None and not isinstance(data, (torch.Tensor, CalibrationSet)):
            tokenizer = _tokenizer_for(model)

        def score_share(share):
            stats = collect_layer_stats_streamed(model, share, batch_size=batch_size, angular_span=angular_span,
                                                 device=device, dtype=dtype, progress=progress,
                                                 activation_budget=activation_budget)
            streaming_info.update(stats.streaming)
            return stats

        model_dtype, model_device = str(DTYPES[dtype]), str(device)
    else:
        if isinstance(model, str):
            model, loaded_tokenizer = load(model, device=device, dtype=dtype, device_map=device_map)
            tokenizer = tokenizer or loaded_tokenizer
            timings["load_s"] = time.perf_counter() - started
        net = model

        def score_share(share):
            return collect_layer_stats(net, share, batch_size=batch_size, angular_span=angular_span,
                                       progress=progress)

        model_dtype, model_device = str(next(net.parameters()).dtype), str(next(net.parameters()).device)
    calib_started = time.perf_counter()
    calib = calibration_set(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed, padding=padding,
                            attention_mask=attention_mask, text_field=text_field)
    timings["calibration_s"] = time.perf_counter() - calib_started
    stats = scored_in_shares(calib, score_share, device=model_device)
    timings["scoring_s"] = stats.seconds
    timings["tokens_per_s"] = calib.num_tokens / stats.seconds if stats.seconds > 0 else float("nan")
    settings = dict(calib.description, batch_size=batch_size, dtype=model_dtype, device=model_device)
    if streamed:
        settings["streamed"] = True
        timings.update({f"streamed_{k}": v for k, v in streaming_info.items() if k.endswith("_s")})
        settings["activations"] = streaming_info.get("activations")
    return Scores(model=str(name), stats=stats, calibration=settings, seed=seed, timings=timings)


def _tokenizer_for(model: str):
    from transformers import AutoTokenizer

    from .models.loading import ModelLoadError, resolve_model_path

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer for {model!r}: {str(err).splitlines()[0]}") from None


def prune(model: nn.Module, layers: Sequence[int], verify: bool = True) -> nn.Module:
    """Remove `layers` from a loaded model in place (config, layer_idx and per-layer fields kept consistent).

    With `verify` (the default) the pruned config is first proven to build the original minus the removed blocks;
    a refusal (StructureMismatch, a ValueError) leaves the model untouched. Example: `prune(model, [21, 22, 25])`.
    """
    return prune_model(model, layers, verify=verify)
