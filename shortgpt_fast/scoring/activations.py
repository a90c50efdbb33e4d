"""Where a streamed pass keeps the hidden states between two blocks: the device, pinned host memory, or a file."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from . import hardware
from .weights import StreamingError

# Fraction of free memory that activations may take; the rest is for the blocks in flight and the kernels' scratch.
ACTIVATION_MEMORY_FRACTION = 0.5


class ActivationStore:
    """Hidden states of every calibration batch between two blocks: on the device, in (pinned) host memory, or in a
    temporary file when neither can hold them. put(batch, tensor) / get(batch) -> tensor on the device."""

    def __init__(self, tier: str, device):
        self.tier = tier
        self.device = torch.device(device)
        self._held: dict[int, torch.Tensor] = {}
        self._file = None
        self._slots: dict[int, tuple[int, torch.Size, torch.dtype]] = {}
        self._end = 0
        if tier == "disk":
            self._file = tempfile.TemporaryFile(prefix="shortgpt-fast-activations-")

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        if self.tier == "device":
            self._held[batch] = hidden
        elif self.tier == "host":
            host = self._held.get(batch)
            if host is None or host.shape != hidden.shape or host.dtype != hidden.dtype:
                host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=self.device.type == "cuda")
                self._held[batch] = host
            host.copy_(hidden)
        else:
            data = hidden.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
            if batch not in self._slots:
                self._slots[batch] = (self._end, hidden.shape, hidden.dtype)
                self._end += data.nbytes
            offset = self._slots[batch][0]
            os.pwrite(self._file.fileno(), data, offset)

    def get(self, batch: int) -> torch.Tensor:
        if self.tier == "device":
            return self._held[batch]
        if self.tier == "host":
            return self._held[batch].to(self.device, non_blocking=True)
        offset, shape, dtype = self._slots[batch]
        out = torch.empty(shape, dtype=dtype)
        view = out.view(torch.uint8).reshape(-1).numpy()
        read = os.preadv(self._file.fileno(), [view], offset)
        if read != view.nbytes:
            raise StreamingError(f"the activation spill file returned {read} of {view.nbytes} bytes; is the "
                                 "temporary folder full?")
        return out.to(self.device)

    def close(self) -> None:
        self._held.clear()
        if self._file is not None:
            self._file.close()


def choose_activation_tier(needed: int, device, budget: Optional[int]) -> tuple[str, str]:
    """Where the streamed pass keeps `needed` bytes of activations: ("device" | "host" | "disk", note).

    budget: bytes allowed on `device`, or None for ACTIVATION_MEMORY_FRACTION of its free memory. "device" when they
    fit (note ""); on CUDA, "host" (pinned memory) when they fit in that fraction of free host memory; else "disk"
    (a temporary file). The note says why for the user. Never refuses: the disk tier is the last resort.
    Example: choose_activation_tier(1 << 20, "cpu", None) == ("device", "") on a machine with a few MB free.
    """
    device = torch.device(device)
    device_budget = (budget if budget is not None
                     else int(ACTIVATION_MEMORY_FRACTION * hardware.available_memory_bytes(device)))
    if needed <= device_budget:
        return "device", ""
    if device.type == "cuda":
        host_budget = int(ACTIVATION_MEMORY_FRACTION * hardware.available_memory_bytes("cpu"))
        if needed <= host_budget:
            return "host", (f"activations ({needed / 1e9:.2f} GB) exceed the device budget "
                            f"({device_budget / 1e9:.2f} GB); keeping them in pinned host memory")
    return "disk", (f"activations ({needed / 1e9:.2f} GB) exceed the memory budget ({device_budget / 1e9:.2f} GB); "
                    f"spilling them to a temporary file in {tempfile.gettempdir()} (slower; lower --samples or "
                    "--seq-len to avoid it)")
