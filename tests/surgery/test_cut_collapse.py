"""In-place cuts that remove dropped bytes with collapse-range instead of rebuilding the shard.

Real checkpoints have layer tensors whose sizes are multiples of 4 KiB, which is what lets the filesystem drop them
from the extent map. The fixture is a bf16 Llama with hidden size 1024, the smallest shape where that holds for
every layer (two 2 KiB norms per layer make 4 KiB), while the norms leave every hole starting off a block boundary.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cut_checkpoint import _load_checked, _logits, _reference_logits, _tree
from test_cut_real_model_and_fuzz import _FORK_WORKER
from transformers import AutoModelForCausalLM, LlamaConfig

from shortgpt_fast.surgery import cut_in_place as surgery
from shortgpt_fast.surgery.checkpoint import JOURNAL_NAME, SurgeryError, build_plan, cut_checkpoint

# Tests of the surgery engine itself; without the extension (SHORTGPT_FAST_SKIP_CPP=1, or off Linux) they skip.
_C = pytest.importorskip("shortgpt_fast._C", reason="the C++ extension is not built (SHORTGPT_FAST_SKIP_CPP=1?)",
                         exc_type=ImportError)
if not hasattr(_C, "safetensors_read_header"):
    pytest.skip("shortgpt_fast._C was built without checkpoint surgery (Linux only)", allow_module_level=True)

SUPPORTED, BLOCK = _C.collapse_range_support(os.environ.get("TMPDIR", "/tmp"))
needs_collapse = pytest.mark.skipif(not SUPPORTED, reason="the temp filesystem has no FALLOC_FL_COLLAPSE_RANGE")
REMOVE = [1, 3]  # _FORK_WORKER cuts these


@pytest.fixture(scope="module")
def aligned_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=1024, intermediate_size=64, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=6, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(root / "src", max_shard_size=12 << 20)
    golden = root / "golden"
    cut_checkpoint(root / "src", REMOVE, out=golden)
    return root / "src", golden


@needs_collapse
def test_fixture_takes_the_collapse_path(aligned_llama):
    src, _ = aligned_llama
    plan = build_plan(src, REMOVE)
    surgery._plan_collapses(src, plan)
    kinds = [s.kind for s in plan.shards]
    assert "collapse" in kinds, kinds
    collapsed = [s for s in plan.shards if s.kind == "collapse"]
    assert any(h[0] % BLOCK for s in collapsed for h in s.holes), "no hole starts off a block boundary"


@needs_collapse
def test_collapse_in_place_is_byte_identical_to_copy_mode_and_reloads(aligned_llama, tmp_path):
    src, golden = aligned_llama
    work = shutil.copytree(src, tmp_path / "work")
    plan = build_plan(work, REMOVE)
    surgery._plan_collapses(work, plan)
    inodes = {s.target: (work / s.source).stat().st_ino for s in plan.shards if s.kind == "collapse"}
    result = cut_checkpoint(work, REMOVE, in_place=True, verify=True)
    assert _tree(work) == _tree(golden)
    # The same inode means the kept bytes were never copied into a new file.
    assert {t: (work / t).stat().st_ino for t in inodes} == inodes
    assert result.bytes_copied == 0
    expected, _ = _reference_logits(src, REMOVE)
    assert torch.equal(_logits(_load_checked(work)), expected)


@needs_collapse
def test_sigkill_during_collapse_then_rerun_is_byte_identical(aligned_llama, tmp_path):
    src, golden = aligned_llama
    writes = _count_writes(src, tmp_path)
    assert writes >= 4, f"a fresh run makes only {writes} writes; the collapse path is not being exercised"
    rng = random.Random(7)
    scenarios = []
    for k in range(writes):
        chain = [["write", k]] + [["write", rng.randrange(writes)] for _ in range(rng.randrange(3))]
        scenarios.append({"work": str(shutil.copytree(src, tmp_path / f"w{k}")), "copy_method": "auto",
                          "kills": chain})
    proc = subprocess.run([sys.executable, "-c", _FORK_WORKER, json.dumps(scenarios)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    golden_tree = _tree(golden)
    for scenario, codes in zip(scenarios, json.loads(proc.stdout.strip().splitlines()[-1])):
        label = f"kills {scenario['kills']}"
        assert codes[0] == -9 and codes[-1] == 0 and set(codes) <= {0, -9}, f"{label}: exit codes {codes}"
        work = Path(scenario["work"])
        assert not (work / JOURNAL_NAME).exists(), label
        assert _tree(work) == golden_tree, f"{label}: result differs from copy mode's"


def _count_writes(src: Path, tmp_path: Path) -> int:
    # The C++ hook kills after the k-th write; the smallest k that lets the run finish is the write count.
    for k in range(64):
        work = shutil.copytree(src, tmp_path / f"count{k}")
        proc = subprocess.run([sys.executable, "-c", _FORK_WORKER,
                               json.dumps([{"work": str(work), "copy_method": "auto", "kills": [["write", k]]}])],
                              capture_output=True, text=True, timeout=120)
        shutil.rmtree(work)
        if json.loads(proc.stdout.strip().splitlines()[-1]) == [[0]]:
            return k
    raise AssertionError("a fresh run made more than 64 writes")


@needs_collapse
def test_remove_ranges_matches_splicing_and_resumes(tmp_path):
    rng = random.Random(3)
    data = bytes(rng.getrandbits(8) for _ in range(40 * BLOCK + 123))
    # Off-boundary starts with whole-block lengths, one at offset 0's block, and one that runs to the end of file.
    holes = [(100, 100 + 3 * BLOCK), (10 * BLOCK + 7, 12 * BLOCK + 7), (30 * BLOCK + 1, len(data))]
    expected = bytearray(data)
    for start, end in reversed(holes):
        del expected[start:end]
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    _C.safetensors_remove_ranges(str(path), holes, len(data))
    assert path.read_bytes() == bytes(expected)
    # Rerunning a finished job is a no-op: the size says every range is gone.
    _C.safetensors_remove_ranges(str(path), holes, len(data))
    assert path.read_bytes() == bytes(expected)


def test_remove_ranges_refuses_what_it_cannot_do(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(8 * BLOCK))
    with pytest.raises(ValueError, match="not a multiple of the filesystem block"):
        _C.safetensors_remove_ranges(str(path), [(10, 20)], 8 * BLOCK)
    with pytest.raises(ValueError, match="sorted and disjoint"):
        _C.safetensors_remove_ranges(str(path), [(BLOCK + 1, 2 * BLOCK + 1), (2 * BLOCK, 3 * BLOCK)], 8 * BLOCK)
    with pytest.raises(ValueError, match="matches no step of this cut"):
        _C.safetensors_remove_ranges(str(path), [(BLOCK, 2 * BLOCK)], 10 * BLOCK)


@needs_collapse
def test_collapse_refuses_a_shard_changed_outside_the_cut(aligned_llama, tmp_path, monkeypatch):
    src, _ = aligned_llama
    work = shutil.copytree(src, tmp_path / "work")

    def stop_after_journal(step, what):
        if what == "journal written":
            raise KeyboardInterrupt

    monkeypatch.setattr(surgery, "after_step_hook", stop_after_journal)
    with pytest.raises(KeyboardInterrupt):
        cut_checkpoint(work, REMOVE, in_place=True)
    monkeypatch.setattr(surgery, "after_step_hook", None)
    journal = json.loads((work / JOURNAL_NAME).read_text())
    victim = next(s for s in journal["plan"]["shards"] if s["kind"] == "collapse")
    with open(work / victim["source"], "ab") as f:
        f.write(b"x" * BLOCK)
    with pytest.raises(SurgeryError, match="changed outside the cut"):
        cut_checkpoint(work, REMOVE, in_place=True)
