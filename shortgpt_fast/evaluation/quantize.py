"""Quantization combined with pruning (the paper's Table 5): bitsandbytes 4-bit NF4 or torchao int4 weight-only.

Both go through transformers' quantization configs (`BitsAndBytesConfig`, `TorchAoConfig`), which are applied only
while loading, so an in-memory (possibly pruned) model is saved to a temporary folder and loaded back quantized.
bitsandbytes >= 0.45 runs NF4 on CPU and GPU alike. torchao's int4 weight-only has a different tensor per device:
on CPU the prototype `Int4OpaqueTensor` (packed for the `_weight_int4pack_mm_for_cpu` kernel, any float dtype), on
CUDA the tinygemm layout (`Int4TilePackedTo4dTensor`, bfloat16 only); its default "plain" layout needs the separate
mslk kernels and does not run on CPU.

Two orders are compared: quantize -> score -> prune (Block Influence measured on the quantized model) and
score -> prune -> quantize; the report shows whether quantization changed which layers were chosen.
"""
from __future__ import annotations

import tempfile
from typing import Optional

import torch
from torch import nn

from ..errors import one_line
from ..models import loading  # noqa: F401  (silences torchao import noise before transformers loads it)
from . import EvaluationError

METHODS = ("nf4", "int4")
LIBRARIES = {"nf4": "bitsandbytes", "int4": "torchao"}
# One scale and zero point per 64 weights of a row: the same block length as bitsandbytes' NF4, so the two methods
# differ in the code book and not in how coarse the scales are.
INT4_GROUP_SIZE = 64
_ALTERNATIVE = {"nf4": "int4", "int4": "nf4"}


def check_method(method: str) -> None:
    """Refuse a 4-bit method other than nf4 / int4, naming both."""
    if method not in METHODS:
        raise EvaluationError(f"unknown quantization {method!r}; choose nf4 (bitsandbytes 4-bit NormalFloat) or "
                              "int4 (torchao int4 weight-only)")


def _bnb_config(method: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EvaluationError("--quantize nf4 needs bitsandbytes >= 0.45 (CPU or GPU); run: pip install "
                              "'shortgpt-fast[quantize]', or use --quantize int4 (torchao)") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=compute_dtype)


def _import_torchao():
    try:
        import torchao
    except ImportError:
        raise EvaluationError("--quantize int4 needs torchao; run: pip install 'shortgpt-fast[quantize]', or use "
                              "--quantize nf4 (bitsandbytes)") from None
    return torchao


def require_backend(method: str) -> None:
    """Fail on an unknown method or a missing library before minutes go into loading and scoring."""
    check_method(method)
    if method == "nf4":
        _bnb_config(method, torch.float32)
    else:
        _import_torchao()


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers transformers quantizes: all but the output head (kept in float for every model)."""
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def _torchao_config(model: nn.Module, device: torch.device, dtype: torch.dtype):
    _import_torchao()
    from transformers import TorchAoConfig

    # torchao silently leaves a layer in float when its input size is not a whole number of groups; a half-quantized
    # model would be reported as int4, so refuse instead.
    odd = [(name, m.in_features) for name, m in _quantized_linears(model) if m.in_features % INT4_GROUP_SIZE]
    if odd:
        name, width = odd[0]
        raise EvaluationError(f"torchao int4 quantizes groups of {INT4_GROUP_SIZE} inputs, but {name} has "
                              f"{width} inputs; use --quantize nf4, whose blocks need no such alignment")
    if device.type == "cpu":
        try:
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        except ImportError:  # a prototype API: later torchao releases may move or promote it
            import torchao

            raise EvaluationError(f"torchao {torchao.__version__} has no CPU int4 weight-only config "
                                  "(PrototypeInt4WeightOnlyConfig, torchao 0.18); use --quantize nf4") from None
        config = PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, set_inductor_config=False)
    elif device.type == "cuda":
        if dtype != torch.bfloat16:
            raise EvaluationError(f"torchao int4 on CUDA (tinygemm) computes in bfloat16, not {dtype}; pass --dtype "
                                  "bfloat16, or use --quantize nf4")
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d",
                                      set_inductor_config=False)
    else:
        raise EvaluationError(f"torchao int4 weight-only runs on cpu and cuda, not {device.type}; use --quantize nf4")
    return TorchAoConfig(config)


def quantize(model: nn.Module, method: str = "nf4", device: Optional[str] = None) -> nn.Module:
    """A 4-bit copy of `model`: every linear layer but the output head becomes a bitsandbytes Linear4bit (nf4) or
    holds a torchao int4 weight tensor (int4)."""
    from transformers import AutoModelForCausalLM

    check_method(method)
    param = next(model.parameters())
    device = torch.device(device or param.device)
    if method == "nf4":
        config = _bnb_config(method, param.dtype)
    else:
        config = _torchao_config(model, device, param.dtype)
    with tempfile.TemporaryDirectory(prefix="shortgpt-quant-") as tmp:
        model.save_pretrained(tmp)
        try:
            quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config,
                                                             device_map=str(device), dtype=param.dtype)
        except (RuntimeError, ValueError, ImportError, AssertionError, NotImplementedError) as err:
            message = one_line(err)
            raise EvaluationError(f"{LIBRARIES[method]} cannot quantize to {method} on {device}: {message}; try "
                                  f"--quantize {_ALTERNATIVE[method]}, or evaluate without --quantize") from None
    quantized = quantized.eval()
    missing = [name for name, _ in _quantized_linears(quantized) if name not in set(four_bit_modules(quantized))]
    if missing:
        raise EvaluationError(f"{LIBRARIES[method]} left {len(missing)} linear layers unquantized (first: "
                              f"{missing[0]}); try --quantize {_ALTERNATIVE[method]}")
    return quantized


def _torchao_int4_types() -> tuple[type, ...]:
    import sys

    if "torchao" not in sys.modules:  # nothing can hold a torchao tensor if torchao was never imported
        return ()
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int4TilePackedTo4dTensor

    return (Int4OpaqueTensor, Int4TilePackedTo4dTensor)


def four_bit_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is stored in 4 bits (bitsandbytes Linear4bit or a torchao int4 tensor)."""
    try:
        import bitsandbytes as bnb
        bnb_types: tuple[type, ...] = (bnb.nn.Linear4bit,)
    except ImportError:
        bnb_types = ()
    ao_types = _torchao_int4_types()
    return [name for name, m in model.named_modules()
            if isinstance(m, bnb_types) or (ao_types and isinstance(getattr(m, "weight", None), ao_types))]


def _stored_bytes(t: torch.Tensor) -> int:
    # torchao tensors are wrappers whose numel and dtype describe the float weight they stand for; what is stored
    # is their inner tensors (packed int4 data, scales and zero points).
    names = getattr(t, "tensor_data_names", None)
    if names is not None:
        inner = list(names) + list(getattr(t, "optional_tensor_data_names", []))
        return sum(_stored_bytes(x) for x in (getattr(t, n, None) for n in inner) if x is not None)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed 4-bit weights count as their packed storage)."""
    return int(sum(_stored_bytes(t) for t in list(model.parameters()) + list(model.buffers())))
