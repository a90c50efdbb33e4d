"""pytest-benchmark view of scoring overhead; run with: pytest bench/test_bench_scoring.py --benchmark-enable"""
import pytest
import torch

from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.scoring.block_influence import collect_layer_stats


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 512, (8, 256), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_bare_forward(benchmark, tiny):
    model, ids = tiny
    with torch.no_grad():
        benchmark(lambda: model.model(input_ids=ids, use_cache=False))


def test_scoring_pass(benchmark, tiny):
    model, ids = tiny
    calib = from_tensors(ids)
    benchmark(lambda: collect_layer_stats(model, calib, batch_size=8, progress=False))
