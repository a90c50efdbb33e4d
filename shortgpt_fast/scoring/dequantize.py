"""Quantized checkpoints in streaming: each weight is dequantized as it loads, on the scoring device.

The arithmetic is the compressed-tensors library's own, through its model-free converters (the ones its
`convert_checkpoint` entry point runs on a checkpoint's tensor dicts):
- `quant_method: fp8` with `weight_block_size` (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8: e4m3 weights, one float32
  `weight_scale_inv` per 128x128 block) through `FP8BlockDequantizer`. transformers' own `Fp8Dequantize` would refuse
  DeepSeek-V3's 576-row `kv_a_proj_with_mqa` (576 is not a multiple of 128); the compressed-tensors one pads the last
  block, as the checkpoint's scale grid does.
- `quant_method: compressed-tensors` (llm-compressor releases: pack-quantized int4/int8 with group, channel or tensor
  scales; float-quantized FP8 with per-tensor or per-channel scales; naive int8) through `CompressedTensorsDequantizer`,
  which looks up each scheme's compressor in the library's registry.
- `quant_method: mxfp4` (gpt-oss: experts stored as e2m1 `*_blocks` with e8m0 `*_scales`) through transformers' own
  `convert_moe_packed_tensors`, the function its `Mxfp4Dequantize` loading op calls.
Anything else is refused in one line that names the method and lists these.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .weights import StreamingError

SUPPORTED = ("fp8 with weight_block_size (DeepSeek/Qwen FP8 layout)",
             "compressed-tensors (pack-quantized int4/int8, float-quantized fp8 per tensor/channel, naive int8)",
             "mxfp4 (gpt-oss)")


def _unsupported(method: str, why: str = "") -> StreamingError:
    return StreamingError(f"streamed scoring cannot dequantize quant_method {method!r}{why}; it supports "
                          f"{'; '.join(SUPPORTED)}: dequantize the checkpoint first, or score it in memory")


class Dequantizer:
    """One checkpoint's dequantization: which stored tensors make a weight, and the weight from them.

    parts(stored name) -> (weight name, companion names) when `stored name` is the root of a quantized weight, else
    None. dequantize(weight name, root, {stored name: tensor}, dtype, out) -> the weight in `dtype`, written into
    `out` where the converter can write in place (the FP8 kernel), else built and cast.
    """

    def __init__(self, method: str, converter, weight_map: dict[str, str], logical=None):
        self.method = method
        self._converter = converter
        self._weight_map = weight_map
        # stored root name -> the weight's name; compressed-tensors roots are `<module>.weight_packed` etc.
        self._logical = logical or (lambda name: f"{name.rpartition('.')[0]}.weight")

    def parts(self, name: str) -> Optional[tuple[str, list[str]]]:
        companions = self._converter.get_dependencies(name)
        if not companions:
            return None
        missing = sorted(c for c in companions if c not in self._weight_map)
        if missing:
            raise StreamingError(f"quantized weight {name} has no {missing[0]} in the checkpoint; re-download or "
                                 "re-save it")
        return self._logical(name), sorted(companions)

    def dequantize(self, name: str, root: str, parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        write = getattr(self._converter, "process_into", None)
        try:
            if write is not None:
                return write(dict(parts), dtype, out)[name]
            result = self._converter.process(dict(parts))
        except Exception as err:  # noqa: BLE001 - the library raises what torch raises on mismatched parts
            from ..errors import one_line

            raise StreamingError(f"cannot dequantize {name} ({self.method}): {one_line(err)}; the checkpoint may be "
                                 "damaged: re-download or re-save it") from None
        return result[name].to(dtype)


def dequantizer_for(folder: str, weight_map: dict[str, str]) -> Optional[Dequantizer]:
    """The Dequantizer for the checkpoint in `folder` (from config.json's quantization_config), or None when it is
    not quantized. Raises StreamingError naming an unsupported method, or when compressed-tensors is missing."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None  # the skeleton reads config.json too and reports what is wrong with it
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method", "?"))
    if method == "mxfp4":
        return Dequantizer(method, _Mxfp4Experts(), weight_map, logical=lambda name: name[: -len("_blocks")])
    if method not in ("fp8", "compressed-tensors"):
        raise _unsupported(method)
    try:
        from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
        from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    except ImportError:
        raise StreamingError(f"streamed scoring of a {method} checkpoint dequantizes through the compressed-tensors "
                             "library: pip install compressed-tensors") from None
    if method == "fp8":
        block = quant.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                             for b in block)):
            raise _unsupported(method, f" without a weight_block_size of two positive ints (got {block!r})")
        targets = frozenset(n.rpartition(".")[0] for n in weight_map if n.endswith(".weight_scale_inv"))
        converter = FP8BlockDequantizer(ignore=tuple(quant.get("modules_to_not_convert") or ()), targets=targets,
                                        weight_block_size=tuple(block), dtype=torch.float32)
        converter._checkpoint_targets = targets  # as its from_pretrained sets it: exactly the modules with scales
        return Dequantizer(method, _FP8BlockOnCPU(converter, tuple(block)), weight_map)
    try:
        converter = CompressedTensorsDequantizer(folder, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - pydantic or the library's own ValueError on a config it cannot read
        from ..errors import one_line

        raise _unsupported(method, f" with this quantization_config ({one_line(err)})") from None
    return Dequantizer(method, converter, weight_map)


class _FP8BlockOnCPU:
    """compressed-tensors' FP8BlockDequantizer with its arithmetic run by our C++ kernel where that can run
    (ops/dequant_fp8: the same float32 products, ~10x torch's CPU cast, which bounded FP8 MoE streaming), and by the
    library itself otherwise. Which tensors make a weight stays the library's answer."""

    def __init__(self, converter, block: tuple[int, int]):
        self._converter = converter
        self._block = block

    def get_dependencies(self, name: str) -> set[str]:
        return self._converter.get_dependencies(name)

    def process_into(self, parts: dict[str, torch.Tensor], dtype: torch.dtype,
                     out: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{weight name: the weight in `dtype`}, written into `out` when given and the kernel can write there."""
        from ..ops.dequant_fp8 import fp8_block_dequantize, why_not_native

        scales = [n for n in parts if n.endswith(".weight_scale_inv")]
        if len(parts) == 2 and len(scales) == 1:
            weight_name = scales[0][: -len("_scale_inv")]
            weight, scale = parts.get(weight_name), parts[scales[0]]
            if weight is not None and not why_not_native(weight, scale, self._block):
                if out is not None and why_not_native(weight, scale, self._block, out):
                    out = None  # the caller copies what it gets
                return {weight_name: fp8_block_dequantize(weight, scale, self._block, dtype=dtype, out=out)}
        return {name: value.to(dtype) for name, value in self._converter.process(parts).items()}


class _Mxfp4Experts:
    """gpt-oss's MXFP4 experts (`<proj>_blocks` uint8 [experts, rows, groups, 16] of e2m1 pairs, `<proj>_scales` e8m0
    [experts, rows, groups]) as the (get_dependencies, process) pair the compressed-tensors converters offer."""

    @staticmethod
    def get_dependencies(name: str) -> set[str]:
        return {name[: -len("_blocks")] + "_scales"} if name.endswith("_blocks") else set()

    @staticmethod
    def process(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        root = next(n for n in parts if n.endswith("_blocks"))
        weight = root[: -len("_blocks")]
        return {weight: convert_moe_packed_tensors(parts[root], parts[weight + "_scales"], dtype=torch.float32)}
