"""compute_dtype: which dtype streamed blocks compute in, chosen from the CPU's flags, while the activations crossing
blocks keep the dtype asked for."""
from __future__ import annotations

import pytest
import torch
from test_streamed_giant import calibration
from tiny_models import tiny_qwen3
from transformers import AutoModelForCausalLM

from shortgpt_fast.scoring import hardware
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-bf16")
    tiny_qwen3(num_layers=4).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_auto_without_native_bf16_upcasts_each_block_to_float32(bf16_checkpoint, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    calib = calibration()
    got = collect_layer_stats_streamed(str(bf16_checkpoint), calib, batch_size=2, angular_span=2, progress=False,
                                       compute_dtype="auto")
    assert got.streaming["compute_dtype"] == "float32"
    assert "lacks native BF16" in got.streaming["compute_dtype_reason"]
    # The bf16 checkpoint upcast as it loads computes exactly what the model loaded in float32 computes.
    loaded = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32).eval()
    expected = collect_layer_stats(loaded, calib, batch_size=2, angular_span=2, progress=False)
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-7, atol=1e-12)


def test_auto_with_native_bf16_computes_in_bfloat16_and_keeps_float32_activations(bf16_checkpoint, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    calib = calibration()
    got = collect_layer_stats_streamed(str(bf16_checkpoint), calib, batch_size=2, angular_span=2, progress=False,
                                       compute_dtype="auto", dtype="float32")
    assert got.streaming["compute_dtype"] == "bfloat16" and got.streaming["activation_dtype"] == "float32"
    assert "avx512_bf16" in got.streaming["compute_dtype_reason"]
    # bf16 block outputs kept in float32 and cast back to bf16 for the next block lose nothing, so every block sees
    # what it sees in the bf16 model in memory; only BI's reduction reads float32 instead of bf16 copies.
    loaded = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.bfloat16).eval()
    expected = collect_layer_stats(loaded, calib, batch_size=2, angular_span=2, progress=False)
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-5, atol=1e-7)


def test_compute_dtype_choices():
    assert hardware.choose_compute_dtype(None, "cpu", torch.float32)[0] == torch.float32
    assert hardware.choose_compute_dtype("float16", "cpu", torch.float32)[0] == torch.float16
    with pytest.raises(ValueError, match="compute_dtype must be one of auto, float32, bfloat16, float16, not 'fp8'"):
        hardware.choose_compute_dtype("fp8", "cpu", torch.float32)
