"""The compiled core `shortgpt_fast._C`, loaded on first use with an actionable error when it is missing.

The extension is optional at install time (SHORTGPT_FAST_SKIP_CPP=1 installs without a compiler) and its surgery
half is Linux-only (collapse-range, FICLONE, sync_file_range). Importing any module of the package never fails for
want of it: the first call of a feature that needs it raises NativeExtensionError with the fix.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional

from .errors import ShortGPTError

SKIP_ENV = "SHORTGPT_FAST_SKIP_CPP"
# Probe symbols of the two halves of the extension.
SURGERY_SYMBOL = "safetensors_read_header"
KERNEL_SYMBOL = "bi_reduce_cpu"


class NativeExtensionError(ShortGPTError):
    """A feature needs the compiled extension (or a part of it this platform lacks); the message says how to fix it."""


def load(feature: str, needs: Optional[str] = None) -> ModuleType:
    """`shortgpt_fast._C`, or NativeExtensionError naming `feature` and how to get the extension."""
    try:
        from . import _C
    except ImportError as exc:
        raise NativeExtensionError(
            f"{feature} needs the compiled extension shortgpt_fast._C, which is not importable ({exc}); reinstall "
            f"with a C++17 compiler and without {SKIP_ENV}=1: pip install -e . --no-build-isolation") from None
    if needs is not None and not hasattr(_C, needs):
        if needs == SURGERY_SYMBOL and not sys.platform.startswith("linux"):
            raise NativeExtensionError(f"{feature} needs Linux (copy_file_range, collapse-range and reflinks); on "
                                       f"{sys.platform} prune in memory instead (load, prune, save_pretrained)")
        raise NativeExtensionError(f"{feature}: shortgpt_fast._C was built without {needs}; rebuild it with "
                                   "pip install -e . --no-build-isolation")
    return _C


class LazyExtension:
    """Stands in for `_C` in a module: attribute access loads it, so importing the module never needs it."""

    def __init__(self, feature: str, needs: Optional[str] = None):
        self._feature, self._needs = feature, needs

    def __getattr__(self, name: str):
        return getattr(load(self._feature, self._needs), name)
