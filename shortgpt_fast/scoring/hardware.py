"""The machine a streamed pass runs on: free memory, the memory budget for weights in flight, and the compute dtype
its matmuls are fast in."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

# Streaming is chosen automatically when the model would take more than this fraction of the free memory.
AUTO_STREAM_FRACTION = 0.8
# Fraction of free memory that a streamed pass's weights may take by default (the budget for blocks in flight); the
# rest is for the activations, the kernels' scratch and the rest of the machine.
WEIGHT_MEMORY_FRACTION = 0.4


def available_memory_bytes(device) -> int:
    """Free memory in bytes (int) where `device` (str or torch.device) would hold tensors.

    cuda: the free memory torch.cuda.mem_get_info reports for that GPU. Otherwise: MemAvailable from /proc/meminfo,
    or psutil's available memory where /proc is missing. Example: available_memory_bytes("cpu").
    Raises ImportError when neither /proc/meminfo nor psutil is available, RuntimeError for an invalid device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # only where /proc is missing

    return int(psutil.virtual_memory().available)


def default_memory_budget(device, budget: Optional[int] = None) -> int:
    """Bytes the weights in flight may take: `budget` when given (must be > 0), else WEIGHT_MEMORY_FRACTION of the
    free memory on `device`. Raises ValueError for a budget below 1 byte."""
    if budget is not None:
        if int(budget) < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {budget}")
        return int(budget)
    return int(WEIGHT_MEMORY_FRACTION * available_memory_bytes(device))


def return_freed_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB. By default it rises to the size of the largest chunk freed (up to 32 MiB),
    so once the first block is freed, later blocks' tensors come from the heap and their memory is kept after they
    are freed: on a 24-layer checkpoint peak RSS grew by 128 MiB instead of the ~40 MiB three blocks take."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (musl has no mallopt); its allocator returns large chunks anyway


# CPU flags (Linux /proc/cpuinfo names) that give native bf16 matmuls: AVX-512 BF16 and AMX-BF16. Without them torch
# runs bf16 GEMMs by converting in software, several times slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it is missing, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_compute_dtype(requested: Optional[str], device, storage_dtype: torch.dtype,
                         checkpoint_dtype: Optional[torch.dtype] = None) -> tuple[torch.dtype, str]:
    """(dtype the streamed blocks compute in, why) for `requested` in COMPUTE_DTYPES or None.

    None: `storage_dtype` (the dtype activations are kept in between blocks), as before compute_dtype existed.
    "auto" on CPU: bfloat16 where the CPU has native BF16 matmuls (one of NATIVE_BF16_FLAGS), else float32 (each
    block's weights upcast as they load); on GPU: the checkpoint's dtype (`checkpoint_dtype`, else storage_dtype).
    Raises ValueError for a name outside COMPUTE_DTYPES.
    Example: choose_compute_dtype("auto", "cpu", torch.float32) -> (torch.float32, "auto: ... no avx512_bf16 ...").
    """
    if requested is None:
        return storage_dtype, f"compute in the activation dtype {str(storage_dtype).replace('torch.', '')}"
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {requested!r}")
    if requested != "auto":
        return getattr(torch, requested), f"{requested} as requested"
    if torch.device(device).type == "cuda":
        chosen = checkpoint_dtype or storage_dtype
        return chosen, f"auto on GPU: the checkpoint dtype {str(chosen).replace('torch.', '')}"
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    if native:
        return torch.bfloat16, f"auto on CPU: bfloat16 matmuls, the CPU has native BF16 ({', '.join(native)})"
    return torch.float32, (f"auto on CPU: float32, the CPU lacks native BF16 ({' / '.join(NATIVE_BF16_FLAGS)} not "
                           "in /proc/cpuinfo), so each block's weights are upcast to float32 as they load")
