"""The backends of bi_reduce, declared as data in priority order; dispatch takes the first that can run the inputs.

Each backend module is imported by its path on first use and exposes `run(inputs)` and
`not_supported_reasons(inputs)`. A module that cannot be imported (no Triton, no compiled extension) becomes a backend
whose only reason is the import error, so forcing it says how to fix it instead of raising at import.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .contract import BACKEND_ENV, BIReduceError, BIReduceInputs


@dataclass(frozen=True)
class Backend:
    """A loaded backend: its name, `run(inputs) -> float64 [num_seqs, NUM_STATS]` and
    `not_supported_reasons(inputs) -> list[str]` (empty when it can run them).

    auto_devices lists the device types ("cpu", "cuda") on which dispatch may pick it without being forced.
    A backend whose module failed to import still exists: its reasons name the import error and its `run`
    raises RuntimeError with that message.
    """

    name: str
    run: Callable[[BIReduceInputs], torch.Tensor]
    not_supported_reasons: Callable[[BIReduceInputs], list]
    # Device types on which dispatch may pick this backend unasked. Triton can run CPU tensors under
    # TRITON_INTERPRET=1, but only when forced: interpreted, it is orders of magnitude slower than the C++ kernel.
    auto_devices: tuple = ("cpu", "cuda")


@dataclass(frozen=True)
class BackendSpec:
    """How to load a backend, declared as data: name, dotted module path (imported on first use) and auto_devices.

    Example: BackendSpec("cpp", "shortgpt_fast.ops.bi_reduce.cpp", ("cpu", "cuda")). Building one raises nothing;
    import errors surface later, from `backends()`, as a refusing Backend.
    """

    name: str
    module: str
    auto_devices: tuple


# Fastest first: Triton on GPUs, the fused C++ kernel on CPUs, plain torch anywhere.
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("triton", "shortgpt_fast.ops.bi_reduce.triton_kernel", ("cuda",)),
    BackendSpec("cpp", "shortgpt_fast.ops.bi_reduce.cpp", ("cpu", "cuda")),
    BackendSpec("torch", "shortgpt_fast.ops.bi_reduce.naive", ("cpu", "cuda")),
)

_loaded: Optional[dict[str, Backend]] = None


def _load(spec: BackendSpec) -> Backend:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        problem = f"{spec.module} cannot be imported ({exc})"

        def refuse(inputs, _problem=problem):
            raise RuntimeError(_problem)

        return Backend(spec.name, refuse, lambda inputs, _problem=problem: [_problem], spec.auto_devices)
    return Backend(spec.name, module.run, module.not_supported_reasons, spec.auto_devices)


def backends() -> dict[str, Backend]:
    """Every declared backend by name, in priority order."""
    global _loaded
    if _loaded is None:
        _loaded = {spec.name: _load(spec) for spec in BACKENDS}
    return dict(_loaded)


def forced_backend() -> str:
    """The backend named by SHORTGPT_FAST_BACKEND, or '' for automatic choice (the one place the variable is read)."""
    return os.environ.get(BACKEND_ENV, "").strip().lower()


def select_backend(inputs: BIReduceInputs) -> Backend:
    """The backend that will run `inputs`, or BIReduceError listing why each one refused."""
    available = backends()
    forced = forced_backend()
    if forced:
        if forced not in available:
            raise BIReduceError(f"{BACKEND_ENV}={forced} names no available backend; choose one of {sorted(available)}")
        reasons = available[forced].not_supported_reasons(inputs)
        if reasons:
            raise BIReduceError(f"{BACKEND_ENV}={forced} cannot run these inputs: " + "; ".join(reasons))
        return available[forced]
    refused = []
    for name, backend in available.items():
        if inputs.x_in.device.type not in backend.auto_devices:
            refused.append(f"{name}: not chosen automatically for {inputs.x_in.device.type} tensors")
            continue
        reasons = backend.not_supported_reasons(inputs)
        if not reasons:
            return backend
        refused.append(f"{name}: " + "; ".join(reasons))
    raise BIReduceError("bi_reduce: no backend can run these inputs (" + " | ".join(refused) + ")")
