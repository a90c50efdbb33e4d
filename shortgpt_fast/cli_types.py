"""argparse `type=` functions: every numeric or list flag is checked once, where it is defined.

A value that fails raises argparse.ArgumentTypeError, which argparse turns into its usual one-line
"error: argument --x: ..." with exit status 2, before any model, file or output folder is touched.
"""
from __future__ import annotations

import argparse
import math
import re

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
# Flags are trusted input, but a typo such as 1e30 steps must still fail fast rather than loop or allocate.
_MAX_INT = 2**62


def _int(text: str) -> int:
    # ASCII only: int() would also take '1_0' or Arabic-Indic digits, which nobody types on purpose.
    if not isinstance(text, str) or not _INT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r:.60}")
    value = int(text)
    if abs(value) > _MAX_INT:
        raise argparse.ArgumentTypeError(f"{text!r:.60} is too large")
    return value


def int_at_least(low: int):
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r:.60}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r:.60}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r:.60}")
    return value


def open_ratio(text: str) -> float:
    """A fraction strictly between 0 and 1 (removing none or all layers is never what a ratio means)."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text!r:.60}")
    return value


def non_empty_list(item=str):
    """Comma-separated values, at least one, each parsed by `item`; returns the original text re-joined, so the
    code behind the flag keeps receiving the string it always did."""
    def parse(text: str) -> str:
        parts = [p.strip() for p in str(text).split(",")]
        if not any(parts) or not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list with no empty items, got {text!r:.60}")
        for p in parts:
            item(p)
        return ",".join(parts)

    parse.__name__ = "list"
    return parse


_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:[0-9]{1,3})?", re.ASCII)


def device(text: str) -> str:
    """A torch device that exists here: 'cuda' on a CPU-only torch would fail deep inside loading instead."""
    text = str(text).strip()
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r:.60}; use cpu, cuda or cuda:N")
    if text == "cpu":
        return text  # the default: no torch import just to parse flags
    import torch

    kind, _, index = text.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this torch build has no usable CUDA device; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: XPU is not available here; use --device cpu")
    return text


def ratio_or_zero(text: str) -> float:
    """A fraction in [0, 1): 0 is the unpruned baseline in a comparison table."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r:.60}")
    return value


# LoRA dropout is a probability that may be 0 but never 1: the same range as a comparison's ratio.
dropout = ratio_or_zero


def positive_int_or_all(text: str):
    """A whole number >= 1, or the word 'all' (returned as the string "all"), e.g. --angular-span all."""
    if str(text).strip().lower() == "all":
        return "all"
    return positive_int(text)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?", re.ASCII | re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """A size in bytes: a whole number, or a number with a unit (500MB, 1.5GiB, 64GB); at least 1 MB, since a
    smaller weight budget cannot hold any real block and only produces a slower refusal."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 8GB or 512MiB, got {text!r:.60}")
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if not value < 2**62:
        raise argparse.ArgumentTypeError(f"{text!r:.60} is too large")
    if value < 10**6:
        raise argparse.ArgumentTypeError(f"must be at least 1MB, got {text!r:.60}")
    return int(value)

