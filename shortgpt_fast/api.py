"""The typed Python API that mirrors the CLI; this is what other tools embed."""
from __future__ import annotations

import json
import sys
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


class ReportError(ShortGPTError):
    """A `score` report that cannot be used: missing, not JSON, not ours, or scored on another model."""


def load(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32", device_map=None,
         trust_remote_code: bool = False):
    """(model, tokenizer) for a checkpoint folder, hub id or alias such as 'smollm2-135m'.

    device_map (accelerate's, e.g. "auto") spreads one model over several GPUs instead of placing it on `device`.
    trust_remote_code=True (off by default; warns) runs a checkpoint's own modeling code (auto_map, e.g. Baichuan).
    """
    net, tokenizer, _ = load_model(model, device=device, dtype=dtype, device_map=device_map,
                                   trust_remote_code=trust_remote_code)
    return net, tokenizer


def calibration_set(
    calib: CalibrationSource,
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

    calib: a CalibrationSet (returned as is), an integer [n, L] tensor of token ids (attention_mask
    optional, same shape), or a text source for `--calib`. Returns a CalibrationSet.
    Example: calibration_set("my_texts/", tokenizer, samples=8, seq_len=128) (a folder of .txt/.md files).
    Raises CalibrationError when text comes without a tokenizer, and whatever the calibration reader refuses.
    """
    if isinstance(calib, CalibrationSet):
        return calib
    if isinstance(calib, torch.Tensor):
        return calibration.from_tensors(calib, attention_mask)
    if tokenizer is None:
        raise calibration.CalibrationError("text calibration data needs a tokenizer; pass tokenizer=")
    docs, name = calibration.read_documents(calib, text_field=text_field)
    if padding is None:
        calib_set = calibration.packed(tokenizer, docs, samples, seq_len, seed)
    else:
        calib_set = calibration.padded(tokenizer, docs, samples, seq_len, seed, padding_side=padding)
    calib_set.description["source"] = name
    return calib_set


def score(
    model: Union[str, nn.Module],
    calib: CalibrationSource = None,
    *,
    tokenizer=None,
    samples: int = 32,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    padding: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    angular_span: Union[int, str] = 8,
    device: str = "cpu",
    dtype: str = "float32",
    text_field: str = "text",
    progress: bool = True,
    streamed: Optional[bool] = None,
    activation_budget: Optional[int] = None,
    memory_budget: Optional[int] = None,
    compute_dtype: Optional[str] = None,
    device_map=None,
    metrics: Sequence[str] = (),
    quantize: Optional[str] = None,
    trust_remote_code: bool = False,
) -> Scores:
    """Score every block of `model` on calibration `data`; returns per-layer metrics, CIs and rankings.

    streamed=True scores a checkpoint folder or alias one block at a time (models larger than memory); None lets a
    path stream when its estimated size exceeds free memory, and prints the estimate. Under torch.distributed the
    calibration sequences are shared across ranks and gathered back, so every rank returns the full Scores.

    model: a path, alias or loaded nn.Module; calib: anything `calibration_set` takes. Returns a Scores.
    Example: scores = score("path/to/model", "my_texts/", samples=8); scores.select("bi", 3).
    angular_span="all" keeps the distance of every (start, span): Scores.span_map(). metrics names user metrics
    (sf.register_metric) computed beside the built-in ones. quantize="nf4" (bitsandbytes) or "int4" (torchao) scores a
    4-bit copy of the model (evaluation/quantize.py, as `eval --quantize`). trust_remote_code as in `load`.

    memory_budget (bytes every weight held may take, embeddings included) and compute_dtype ("auto", "float32",
    "bfloat16", "float16") are passed to streamed scoring (scoring/streamed.py) and imply streamed=True; what was
    chosen and why is in `.calibration` (compute_dtype, compute_dtype_reason, quantization, blocks_in_parts).

    Raises ValueError for streamed=True with a loaded module, with device_map, with metrics, quantize or
    trust_remote_code, and for memory_budget or compute_dtype without streaming; loading, calibration and scoring
    refusals surface as their own ShortGPTError subclasses (ModelLoadError, CalibrationError, ScoringError).
    """
    from .scoring.distributed import init_from_environment, launched_by_torchrun, scored_in_shares

    if launched_by_torchrun():
        # Under torchrun every rank runs this same call: join the process group here, so an embedding tool gets the
        # data-parallel run without setting torch.distributed up itself.
        device = init_from_environment(device)
    timings = {}
    started = time.perf_counter()
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    if not isinstance(model, str) and streamed:
        raise ValueError("streamed scoring reads the checkpoint itself; pass the model as a path or alias")
    if device_map is not None and streamed:
        raise ValueError("device_map spreads a loaded model over GPUs; streamed scoring loads one block at a time")
    streamed_only = [flag for flag, on in (("memory_budget", memory_budget is not None),
                                           ("compute_dtype", compute_dtype is not None)) if on]
    if streamed_only and (streamed is False or not isinstance(model, str)):
        raise ValueError(f"{streamed_only[0]} applies to streamed scoring only; pass the model as a path and "
                         "streamed=True (--streamed), or drop it")
    if streamed_only and streamed is None:
        streamed = True  # asking for a weight budget or a compute dtype is asking to stream
    in_memory_only = [flag for flag, on in (("metrics", metrics), ("quantize", quantize),
                                            ("trust_remote_code", trust_remote_code)) if on]
    if in_memory_only and streamed:
        raise ValueError(f"{in_memory_only[0]} needs the model in memory; streamed scoring does not support it yet")
    if in_memory_only:
        streamed = False
    if quantize is not None:
        from .evaluation.quantize import require_backend

        require_backend(quantize)  # before minutes go into loading
    if isinstance(model, str) and streamed is None and device_map is None:
        from .scoring.streamed import streaming_decision

        streamed, estimate = streaming_decision(model, dtype, device)
        if streamed:
            print(f"shortgpt-fast: {estimate}", file=sys.stderr)
    streaming_info = {}
    if isinstance(model, str) and streamed:
        from .scoring.streamed import collect_layer_stats_streamed

        if tokenizer is None and not isinstance(calib, (torch.Tensor, CalibrationSet)):
            tokenizer = load_tokenizer(model)

        def score_share(share):
            stats = collect_layer_stats_streamed(model, share, batch_size=batch_size, angular_span=angular_span,
                                                 device=device, dtype=dtype, progress=progress,
                                                 activation_budget=activation_budget, memory_budget=memory_budget,
                                                 compute_dtype=compute_dtype)
            streaming_info.update(stats.streaming)
            return stats

        model_dtype, model_device = str(DTYPES[dtype]), str(device)
    else:
        if isinstance(model, str):
            model, loaded_tokenizer = load(model, device=device, dtype=dtype, device_map=device_map,
                                           trust_remote_code=trust_remote_code)
            tokenizer = tokenizer or loaded_tokenizer
            timings["load_s"] = time.perf_counter() - started
        net = model
        if quantize is not None:
            from .evaluation.quantize import quantize as quantize_4bit

            quantize_started = time.perf_counter()
            net = quantize_4bit(net, quantize)  # a 4-bit copy; the model passed in is left as it is
            timings["quantize_s"] = time.perf_counter() - quantize_started

        def score_share(share):
            return collect_layer_stats(net, share, batch_size=batch_size, angular_span=angular_span,
                                       progress=progress, metrics=metrics)

        model_dtype, model_device = str(next(net.parameters()).dtype), str(next(net.parameters()).device)
    calib_started = time.perf_counter()
    calib_set = calibration_set(calib, tokenizer, samples=samples, seq_len=seq_len, seed=seed, padding=padding,
                            attention_mask=attention_mask, text_field=text_field)
    timings["calibration_s"] = time.perf_counter() - calib_started
    stats = scored_in_shares(calib_set, score_share, device=model_device)
    timings["scoring_s"] = stats.seconds
    timings["tokens_per_s"] = calib_set.num_tokens / stats.seconds if stats.seconds > 0 else float("nan")
    settings = dict(calib_set.description, batch_size=batch_size, dtype=model_dtype, device=model_device)
    if quantize is not None:
        settings["quantize"] = quantize
    if streamed:
        settings["streamed"] = True
        timings.update({f"streamed_{k}": v for k, v in streaming_info.items() if k.endswith("_s")})
        for key in ("activations", "memory_budget", "compute_dtype", "compute_dtype_reason", "quantization",
                    "blocks_in_parts"):
            settings[key] = streaming_info.get(key)
    return Scores(model=str(name), stats=stats, calibration=settings, seed=seed, timings=timings)


def compare_calibrations(model: Union[str, nn.Module], sources: dict, *, ratio: float = 0.25, metric: str = "bi",
                         tokenizer=None, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                         **score_kwargs) -> dict:
    """Score one model on several calibration sources and compare the rankings (the paper's warning that an
    unrepresentative calibration set over-prunes important layers).

    sources: label -> anything `calibration_set` takes (None: the embedded Shakespeare corpus); at least two.
    A path or alias is loaded once. score_kwargs go to `score` (samples, seq_len, batch_size, seed, metrics, ...).
    Returns scoring.calibration_sensitivity's dict (per pair Kendall τ and removed-set overlap at `ratio`, per source
    the layers whose CI overlaps the cut line) with "scores": label -> Scores.
    Example: compare_calibrations("smollm2-135m", {"plays": None, "wiki": "wiki.txt"}, samples=16)["pairs"].
    Raises CalibrationSensitivityError for fewer than two sources, and whatever `score` refuses.
    """
    from .scoring.calibration_sensitivity import CalibrationSensitivityError, calibration_sensitivity

    if len(sources) < 2:
        raise CalibrationSensitivityError(f"compare at least two calibration sources, got {len(sources)}")
    if isinstance(model, str):
        model, loaded_tokenizer = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or loaded_tokenizer
    scores = {label: score(model, source, tokenizer=tokenizer, **score_kwargs) for label, source in sources.items()}
    result = calibration_sensitivity(scores, ratio=ratio, metric=metric)
    result["scores"] = scores
    return result


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


def choose_layers(num_layers: int, *, layers: Union[str, Sequence[int], None] = None, remove: Optional[int] = None,
                  ratio: Optional[float] = None, metric: str = "bi", scores: Optional[Scores] = None,
                  report: Optional[dict] = None) -> list[int]:
    """The layers to remove: explicit `layers` (a list or text such as "21-25,28", original numbering), or the
    `remove` / `ratio` count taken from the `metric` ranking of `scores` or of a saved `report`.

    Returns a sorted list[int]. Example: choose_layers(32, ratio=0.25, scores=scores) -> 8 layers by BI.
    Raises SelectionError for impossible counts or metrics, LayerSpecError for bad layer text.
    """
    from .models.config_surgery import parse_layers, validate_layers
    from .scoring.report import SelectionError, removal_count, select_from_report

    if layers is not None:
        return sorted(validate_layers(parse_layers(layers, num_layers), num_layers))
    n = removal_count(num_layers, remove, ratio)
    if scores is not None:
        return sorted(scores.select(metric, n))
    if report is not None:
        return sorted(select_from_report(report, metric, n))
    raise SelectionError("choosing layers by a metric needs scores or a saved report; pass scores= or report=")


def read_report(path: Union[str, Path], model: Optional[str] = None) -> dict:
    """A `score` report (JSON) read back; with `model`, also checked to score that model.

    A report scored on another model would name layers of a different network (a 30-layer report once pruned a
    4-layer model), so the layer count must match the model's config and, for a local checkpoint, the report's
    block path must exist among its tensor names. Raises ReportError with the command that writes a fitting report.
    """
    from .models.loading import config_layer_count

    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"report {path} does not exist; run `shortgpt-fast score MODEL --out {path}` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"report {path} is not valid JSON ({getattr(err, 'msg', err)}); rerun `shortgpt-fast "
                          "score`") from None
    if not isinstance(report, dict) or any(key not in report for key in ("num_layers", "ranking")):
        raise ReportError(f"report {path} has no num_layers/ranking; it was not written by `shortgpt-fast score`")
    if model is None:
        return report
    count = report.get("num_layers")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ReportError(f"report {path} has no valid num_layers; rerun `shortgpt-fast score`")
    rescore = f"score this model with `shortgpt-fast score {model} --out REPORT`"
    actual = config_layer_count(model)
    if actual != count:
        raise ReportError(f"report {path} scores a {count}-layer model ({report.get('model')!r:.80}) but {model} "
                          f"has {actual} layers; {rescore}")
    block_path = report.get("block_path")
    names = _local_tensor_names(model)
    if isinstance(block_path, str) and names is not None and \
            not any(n.startswith(block_path + ".") or n.startswith("model." + block_path + ".") for n in names):
        raise ReportError(f"report {path} scores blocks at {block_path!r:.80}, which {model} does not have; {rescore}")
    return report


def evaluate_models(models: Sequence[tuple[str, str]], *, device: str = "cpu", dtype: str = "float32",
                    quantize_method: Optional[str] = None, **evaluate_kwargs) -> dict:
    """Evaluate each (label, model path/alias) in turn, one model in memory at a time: {label: results}.

    evaluate_kwargs go to evaluation.evaluate.evaluate (ppl, tasks, throughput, generate, ...); data folders and task
    files are checked before the first model loads. quantize_method ("nf4"/"int4") evaluates 4-bit weights; the
    parameter count is then taken before quantizing (bitsandbytes stores two 4-bit weights per element).
    Example: evaluate_models([("original", "ckpt"), ("pruned", "ckpt-pruned")], ppl="wikitext2", tasks=["piqa"]).
    """
    import logging

    from .evaluation.evaluate import check_inputs_early, evaluate
    from .evaluation.quantize import quantize, require_backend

    check_inputs_early(evaluate_kwargs)
    if quantize_method:
        require_backend(quantize_method)
    if not evaluate_kwargs.get("progress", True):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = {}
    for label, name in models:
        net, tokenizer = load(name, device=device, dtype=dtype)
        params = sum(p.numel() for p in net.parameters())
        if quantize_method:
            net = quantize(net, quantize_method)
        results[label] = evaluate(net, tokenizer, **evaluate_kwargs)
        results[label]["model"] = name
        if quantize_method:
            results[label].update(params=params, quantization=quantize_method)
        del net
    return results


def _local_tensor_names(model: str) -> Optional[list]:
    """Tensor names of a local safetensors checkpoint from its index or header alone; None for aliases and hub ids
    (no cheap listing) and for folders whose names cannot be read (the layer-count check then stands alone)."""
    from .io.safetensors import read_weight_map

    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    try:
        weight_map = read_weight_map(folder)
    except (OSError, ValueError):
        return None
    return None if weight_map is None else list(weight_map)


def write_report(scores: Scores, report_path: Path, removed=None) -> None:
    """report.json (the stable JSON schema of Scores.to_dict) and report.png beside it; with the full span map
    (angular_span="all") also its heatmap, report_spans.png."""
    from .scoring.plot import plot_scores, plot_span_map

    report_path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(report_path)
    plot_scores(scores, report_path.with_suffix(".png"), removed=removed)
    if scores.has_span_map:
        plot_span_map(scores, report_path.with_name(report_path.stem + "_spans.png"))


def prune_to_dir(model: str, out_dir: Path, layers: list, metric: str, scores=None, loaded=None,
                 report: Optional[dict] = None, verify: bool = True) -> dict:
    """Write OUT_DIR as a standard checkpoint without `layers`, plus report.json (and report.png when `scores` are
    given) and a model card stating the removal once.

    Local checkpoint folders go through checkpoint surgery (no model load; never a silent fallback to loading: on a
    70B checkpoint that would be an OOM), a .gguf file through the GGUF cut (OUT_DIR holds the cut .gguf, its
    quantized blocks untouched); anything else is pruned in memory. Either way the folder is staged beside
    OUT_DIR with the report inside and renamed at the end (io/durable.py), so a failure leaves no half-written folder.
    Returns the report written as report.json, with "engine" naming the path taken.

    Example: prune_to_dir("ckpt/", Path("ckpt-pruned"), [21, 22, 25], "manual")
    """
    from .io.durable import check_out_dir, staged_folder
    from .models.loading import config_layer_count, gguf_model_file, is_local_checkpoint, resolve_model_path

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if scores is not None:
        num_layers = scores.num_layers
    elif report is not None and isinstance(report.get("num_layers"), int):
        num_layers = report["num_layers"]
    else:
        num_layers = config_layer_count(model)
    files, report_dict = _report_files(model, layers, metric, num_layers, scores, report)
    gguf = gguf_model_file(model) if isinstance(model, str) else None
    if gguf is not None:
        from .io.gguf import split_base_name
        from .surgery.gguf_cut import cut_gguf

        with staged_folder(out_dir) as staged:
            # Quantized blocks are carried as they are: the output is the same kind of file, minus the layers.
            cut_gguf(gguf, layers, out=staged.path / f"{split_base_name(gguf)}.gguf", chosen_by=metric, check=verify)
            _write_report_and_card(staged.path, files, model, layers, num_layers, metric)
        report_dict["engine"] = "gguf-surgery"
        return report_dict
    if is_local_checkpoint(model):
        from .surgery.checkpoint import cut_checkpoint

        cut_checkpoint(resolve_model_path(model), layers, out=out_dir, check=verify, chosen_by=metric,
                       extra_files=files)
        report_dict["engine"] = "checkpoint-surgery"
        return report_dict
    net, tokenizer = loaded if loaded is not None else load(model)
    prune_model(net, layers, verify=verify)
    with staged_folder(out_dir) as staged:
        net.save_pretrained(staged.path)
        tokenizer.save_pretrained(staged.path)
        _write_report_and_card(staged.path, files, model, layers, num_layers, metric)
    report_dict["engine"] = "in-memory"
    return report_dict


def _write_report_and_card(folder: Path, files: dict, model: str, layers: list, num_layers: int, metric: str) -> None:
    """The report files and a model card stating the removal once, for outputs whose writer leaves no card (the
    safetensors cut path writes the source's card plus the removal itself)."""
    from .surgery.model_card import removal_section

    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text(removal_section(sorted(layers), num_layers, chosen_by=metric, source=model,
                                                      report=True))


def _report_files(model: str, layers: list, metric: str, num_layers: int, scores, report) -> tuple[dict, dict]:
    """({file name: bytes}, report dict) of the report a pruned folder carries: the scores with the cut marked, or
    the reused report (or a minimal one) with the removal added."""
    import io as bytes_io

    from .models.config_surgery import index_map

    mapping = index_map(layers, num_layers)
    if scores is not None:
        from .scoring.plot import plot_scores

        scores.mark_removed(layers, metric, mapping)
        report_dict = scores.to_dict()
        png = bytes_io.BytesIO()
        plot_scores(scores, png, removed=layers)
        files = {"report.json": json.dumps(report_dict, indent=1).encode(), "report.png": png.getvalue()}
        return files, report_dict
    report_dict = dict(report or {"model": model, "num_layers": num_layers})
    report_dict.update({"removed": sorted(layers), "removal_metric": metric,
                        "index_map": {str(k): v for k, v in mapping.items()}})
    return {"report.json": json.dumps(report_dict, indent=1).encode()}, report_dict
