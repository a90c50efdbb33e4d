"""The typed Python API that mirrors the CLI; this is what other tools embed."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .data import calibration
from .data.calibration import CalibrationSet
from .errors import ShortGPTError
from .models.loading import DEFAULT_MODEL, DTYPES, load_model, load_tokenizer
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

    data: a CalibrationSet (returned as is), an integer [n, L] tensor of token ids (attention_mask
    optional, same shape), or a text source for `--calib`. Returns a CalibrationSet.
    Example: calibration_set("my_texts/", tokenizer, samples=8, seq_len=128) (a folder of .txt/.md files).
    Raises CalibrationError when text data comes without a tokenizer, and whatever the calibration reader refuses.
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

    model: a path, alias or loaded nn.Module; data: anything `calibration_set` takes. Returns a Scores.
    Example: scores = score("path/to/model", "my_texts/", samples=8); scores.select("bi", 3).
    Raises ValueError for streamed=True with a loaded module or with device_map; loading, calibration and scoring
    refusals surface as their own ShortGPTError subclasses (ModelLoadError, CalibrationError, ScoringError).
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
            tokenizer = load_tokenizer(model)

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


def prune(model: nn.Module, layers: Sequence[int], verify: bool = True) -> nn.Module:
    """Remove `layers` from a loaded model in place (config, layer_idx and per-layer fields kept consistent).

    With `verify` (the default) the pruned config is first proven to build the original minus the removed blocks;
    a refusal (StructureMismatch, a ValueError) leaves the model untouched. Example: `prune(model, [21, 22, 25])`.
    """
    return prune_model(model, layers, verify=verify)


def cut(checkpoint: Union[str, Path], layers: Union[str, Sequence[int]], out: Union[str, Path, None] = None, *,
        in_place: bool = False, verify: bool = True, verify_bytes: bool = False, chosen_by: str = "manual"):
    """Remove `layers` from a safetensors checkpoint folder on disk, without loading the model.

    Exactly one of `out` (a new folder; the source is only read) or `in_place=True` (crash-safe, exactly once).
    `verify` proves the pruned config builds the original minus the removed blocks before anything is written;
    `verify_bytes` also rehashes every kept tensor of the result. Returns a CutResult.

    Example: cut("Llama-3-8B", "21-25", out="Llama-3-8B-cut")
    """
    from .surgery.checkpoint import cut_checkpoint

    return cut_checkpoint(checkpoint, layers, out=out, in_place=in_place, verify=verify_bytes, check=verify,
                          chosen_by=chosen_by)


def write_report(scores: Scores, report_path: Path, removed=None) -> None:
    """report.json (the stable JSON schema of Scores.to_dict) and report.png beside it."""
    from .scoring.plot import plot_scores

    report_path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(report_path)
    plot_scores(scores, report_path.with_suffix(".png"), removed=removed)


def check_out_dir(out_dir: Path) -> None:
    """The one "new or empty output folder" rule of every command that writes a folder.

    out_dir: a Path; returns None when it does not exist or is an empty folder.
    Raises ShortGPTError when it exists and is a file or a non-empty folder, so nothing is ever overwritten.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ShortGPTError(f"output folder {out_dir} already exists and is not empty; choose a new OUT_DIR")


def prune_to_dir(model: str, out_dir: Path, layers: list, metric: str, scores=None, loaded=None,
                 report: Optional[dict] = None, verify: bool = True) -> dict:
    """Write OUT_DIR as a standard checkpoint without `layers`, plus report.json and a model card.

    Local checkpoint folders go through checkpoint surgery (no model load); anything else is pruned in memory.
    Everything is staged beside OUT_DIR and renamed at the end, so a failure leaves no half-written folder.
    Returns the report written as report.json, with "engine" naming the path taken.

    Example: prune_to_dir("ckpt/", Path("ckpt-pruned"), [21, 22, 25], "manual")
    """
    from .models.config_surgery import index_map, layer_count
    from .models.loading import is_local_checkpoint, resolve_model_path
    from .surgery.model_card import removal_section

    check_out_dir(out_dir)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging = staging_root / "out"
    try:
        engine = "in-memory"
        if is_local_checkpoint(model):
            # Never a silent fallback to loading the whole model: on a 70B checkpoint that is an OOM, so a missing
            # extension is an error that says how to get it.
            from .surgery.checkpoint import cut_checkpoint

            cut_checkpoint(resolve_model_path(model), layers, out=str(staging), check=verify, chosen_by=metric)
            engine = "checkpoint-surgery"
        else:
            if loaded is None:
                loaded = load(model)
            net, tokenizer = loaded
            from .surgery.in_memory import prune_model

            prune_model(net, layers, verify=verify)
            net.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        num_layers = scores.num_layers if scores is not None else None
        if num_layers is None:
            num_layers = len(layers) + layer_count(json.loads((staging / "config.json").read_text()))
        mapping = index_map(layers, num_layers)
        if scores is not None:
            scores.mark_removed(layers, metric, mapping)
            write_report(scores, staging / "report.json", removed=layers)
            report_dict = scores.to_dict()
        else:
            report_dict = dict(report or {"model": model, "num_layers": num_layers})
            report_dict.update({"removed": sorted(layers), "removal_metric": metric,
                                "index_map": {str(k): v for k, v in mapping.items()}})
            (staging / "report.json").write_text(json.dumps(report_dict, indent=1))
        report_dict["engine"] = engine
        if engine == "in-memory":
            # The cut wrote its card already (the source's card plus the removal, once); save_pretrained writes none.
            (staging / "README.md").write_text(removal_section(sorted(layers), num_layers, chosen_by=metric,
                                                               source=model, report=True))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return report_dict
