"""score(quantize=...): a 4-bit copy is scored, equal to the float64 reference on that copy's own block inputs and
outputs; the model passed in is left in full precision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_scoring import capture_block_io, reference_metrics
from tiny_models import random_ids, tiny_llama_real_vocab

from shortgpt_fast import api
from shortgpt_fast.evaluation.quantize import four_bit_modules, quantize

LIBRARY = {"nf4": "bitsandbytes", "int4": "torchao"}


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_quantized_scores_equal_reference_on_the_4bit_model(tokenizer, method):
    pytest.importorskip(LIBRARY[method])
    model = tiny_llama_real_vocab(tokenizer, num_layers=3, hidden_size=64, intermediate_size=128, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = random_ids(3, 21, seed=9)
    scores = api.score(model, ids, batch_size=2, progress=False, quantize=method)
    assert scores.calibration["quantize"] == method
    quantized = quantize(model, method)  # deterministic: the same 4-bit weights the scorer saw
    assert four_bit_modules(quantized)
    ref = reference_metrics(capture_block_io(quantized, ids))
    np.testing.assert_allclose(scores.bi, [r["bi"] for r in ref], rtol=1e-5)
    float_bi = api.score(model, ids, batch_size=2, progress=False).bi
    assert not np.allclose(scores.bi, float_bi, rtol=1e-6)  # it really scored the 4-bit weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_quantize_is_refused_with_streaming():
    with pytest.raises(ValueError, match="quantize needs the model in memory"):
        api.score("smollm2-135m", None, streamed=True, quantize="nf4", progress=False)
