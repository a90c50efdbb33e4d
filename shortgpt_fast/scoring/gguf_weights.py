"""A GGUF model as a weight source for streamed scoring: tensors by their transformers names, dequantized on demand.

Implements the weight-source protocol of shortgpt_fast/scoring/weights.py (`folder`, `names`, `total_bytes`, `load`),
so a streamed pass can read one block of a GGUF model at a time instead of dequantizing the whole file. Names are
mapped with transformers' own GGUF tables (get_gguf_hf_weights_map) and each tensor goes through the same
per-architecture processor transformers applies when it loads a GGUF (e.g. Llama's q/k un-permutation), so a tensor
loaded here equals the one `from_pretrained(dir, gguf_file=...)` holds. Dequantization gives gguf-py's bits (our
C++ kernel for the common block types, gguf-py itself for the rest). The file is
read with plain positioned reads, never mapped, so resident memory stays at the tensors being loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..io.gguf import GGUFError, TensorInfo, read_set, split_parts

# transformers' per-architecture GGUF processors that only transform a tensor in place (no renaming, no merging of
# several GGUF tensors into one), so a single tensor can be loaded on its own.
_SINGLE_TENSOR_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor",
                             "Lfm2TensorProcessor", "NemotronTensorProcessor", "MambaTensorProcessor")


def gguf_skeleton(path: Union[str, os.PathLike], dtype):
    """The transformers model of a GGUF file's architecture, parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    # Only the first part of a split set carries the model's metadata; any part may be given.
    path = split_parts(path)[0]
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class GGUFSource:
    """Tensors of a GGUF model (one file or a split set) under the names of `model`, a transformers model of its
    architecture (gguf_skeleton). Refuses architectures whose transformers processor merges or renames tensors."""

    def __init__(self, path: Union[str, os.PathLike], model):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.path = Path(path)
        self.folder = self.path.parent
        headers = read_set(self.path)
        arch = headers[0].architecture
        processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if processor_class.__name__ not in _SINGLE_TENSOR_PROCESSORS:
            raise GGUFError(f"{self.path}: streaming a {arch} GGUF needs tensors transformers merges on load "
                            f"({processor_class.__name__}); score it in memory or from a safetensors conversion")
        self._processor = processor_class(config=model.config.to_dict())
        self._gguf_to_hf = get_gguf_hf_weights_map(model, self._processor)
        self._where: dict[str, tuple[Path, int, TensorInfo]] = {}
        for h in headers:
            for t in h.tensors:
                self._where[t.name] = (h.path, h.data_start + t.offset, t)
        self._hf_to_gguf = {hf: g for g, hf in self._gguf_to_hf.items() if g in self._where}
        # Seconds spent reading and dequantizing, over the whole pass (same keys as SafetensorsSource).
        self.seconds = {"read": 0.0, "dequantize": 0.0}

    def names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def total_bytes(self, dtype=None) -> int:
        """Bytes of every mapped tensor as stored or, given a torch `dtype`, dequantized to it."""
        import torch

        total = 0
        for g in self._hf_to_gguf.values():
            t = self._where[g][2]
            if dtype is None:
                total += t.nbytes
            else:
                count = 1
                for d in t.dims:
                    count *= d
                total += count * torch.empty(0, dtype=dtype).element_size()
        return total

    def _raw(self, gguf_name: str) -> tuple[bytes, TensorInfo]:
        path, offset, t = self._where[gguf_name]
        with open(path, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), t.nbytes, offset)
        if len(raw) != t.nbytes:
            raise GGUFError(f"{path}: tensor {gguf_name} ends past the end of the file (truncated?)")
        return raw, t

    @staticmethod
    def _decode(raw: bytes, t: TensorInfo) -> np.ndarray:
        """The tensor as numpy: plain types as stored, block types dequantized to float32 (ops/dequant_gguf: our
        C++ kernel for the common types, gguf-py for the rest, the same bits either way)."""
        from gguf.constants import GGMLQuantizationType as Q

        from ..ops.dequant_gguf import gguf_dequantize

        shape = tuple(reversed(t.dims))  # numpy order
        plain = {Q.F32: np.float32, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32,
                 Q.I64: np.int64}
        qtype = Q(t.ggml_type)
        if qtype in plain:
            return np.frombuffer(raw, dtype=plain[qtype]).reshape(shape)
        return gguf_dequantize(np.frombuffer(raw, dtype=np.uint8), int(qtype), shape)

    def load(self, wanted: dict, device) -> dict:
        """name -> torch tensor on `device` in each request's dtype (rows sliced where asked), for each name."""
        import time

        import torch

        from ..ops.finite import all_finite

        out = {}
        for name, request in wanted.items():
            gguf_name = self._hf_to_gguf.get(name)
            if gguf_name is None:
                raise GGUFError(f"{self.path}: holds no tensor for {name}; transformers' GGUF tables do not map it")
            began = time.perf_counter()
            raw, info = self._raw(gguf_name)
            self.seconds["read"] += time.perf_counter() - began
            began = time.perf_counter()
            weights = self._decode(raw, info)
            weights = self._processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self._gguf_to_hf,
                                              parsed_parameters={}).weights
            array = np.ascontiguousarray(weights)  # copies only a view (Llama's q/k un-permutation) or read-only bytes
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            rows: Optional[tuple[int, int]] = getattr(request, "rows", None)
            if rows is not None:
                tensor = tensor[rows[0]:rows[1]]
            if tensor.is_floating_point():
                tensor = tensor.to(device=device, dtype=request.dtype)
                # Checked in the dtype it computes in, as SafetensorsSource does: float16 can overflow in the cast.
                if not all_finite(tensor):
                    raise GGUFError(f"{self._where[gguf_name][0]}: tensor {gguf_name} holds NaN or inf values once "
                                    f"dequantized to {str(request.dtype).replace('torch.', '')}; the file is corrupt "
                                    "or the compute dtype too narrow: re-download or re-convert it, or compute in "
                                    "float32")
            else:
                tensor = tensor.to(device)
            out[name] = tensor
            self.seconds["dequantize"] += time.perf_counter() - began
        return out
