"""The typed Python API that mirrors the CLI; this is what other tools embed."""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .data import calibration
from .data.calibration import CalibrationSet
from .models.loading import DEFAULT_MODEL, load_model
from .scoring.block_influence import collect_layer_stats
from .scoring.report import Scores
from .surgery.in_memory import prune_model

CalibrationSource = Union[None, str, torch.Tensor, CalibrationSet]


def load(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) for a checkpoint folder, hub id or alias such as 'smollm2-135m'."""
    net, tokenizer, _ = load_model(model, device=device, dtype=dtype)
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
) -> Scores:
    """Score every block of `model` on calibration `data`; returns per-layer metrics, CIs and rankings."""
    timings = {}
    started = time.perf_counter()
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    if isinstance(model, str):
        model, loaded_tokenizer = load(model, device=device, dtype=dtype)
        tokenizer = tokenizer or loaded_tokenizer
        timings["load_s"] = time.perf_counter() - started
    calib_started = time.perf_counter()
    calib = calibration_set(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed, padding=padding,
                            attention_mask=attention_mask, text_field=text_field)
    timings["calibration_s"] = time.perf_counter() - calib_started
    stats = collect_layer_stats(model, calib, batch_size=batch_size, angular_span=angular_span, progress=progress)
    timings["scoring_s"] = stats.seconds
    timings["tokens_per_s"] = calib.num_tokens / stats.seconds if stats.seconds > 0 else float("nan")
    settings = dict(calib.description, batch_size=batch_size, dtype=str(next(model.parameters()).dtype),
                    device=str(next(model.parameters()).device))
    return Scores(model=str(name), stats=stats, calibration=settings, seed=seed, timings=timings)


def prune(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Remove `layers` from a loaded model in place (config, layer_idx and per-layer fields kept consistent)."""
    return prune_model(model, layers)
