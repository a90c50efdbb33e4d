"""Data-parallel scoring over torch.distributed (gloo, 2 CPU processes) equals the single-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import random_ids, tiny_llama

from shortgpt_fast import api
from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.scoring.distributed import shard_calibration, share_counts
from shortgpt_fast.scoring.report import SCORE_METRICS

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def calibration():
    # 5 sequences over 2 ranks: uneven shares (3 + 2), padding on both sides.
    ids = random_ids(5, 17, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[4, 12:] = 0
    return from_tensors(ids, mask)


def _rank_main(rank: int, world_size: int, port: int, folder: str, streamed: bool, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if streamed:
            target = folder
        else:
            from transformers import AutoModelForCausalLM

            target = AutoModelForCausalLM.from_pretrained(folder).eval()  # this checkpoint has no tokenizer to load
        scores = api.score(target, calibration(), batch_size=2, angular_span=3, progress=False, streamed=streamed)
        torch.save({"per_sequence": scores.stats.per_sequence, "span": scores.stats.span_angular,
                    "rankings": {m: scores.ranking(m) for m in SCORE_METRICS}}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_share_counts_cover_every_sequence_once():
    assert share_counts(5, 2) == [3, 2]
    assert share_counts(4, 4) == [1, 1, 1, 1]
    calib = calibration()
    shares = [shard_calibration(calib, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s.input_ids for s in shares]), calib.input_ids)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder, max_shard_size="60KB")
    return folder


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_two_gloo_ranks_equal_single_process(llama_folder, tmp_path, streamed):
    torch.set_num_threads(1)  # the ranks run single-threaded; so does the reference, for the same BLAS path
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    single = api.score(model, calibration(), batch_size=2, angular_span=3, progress=False)
    out = str(tmp_path / "scores")
    mp.start_processes(_rank_main, args=(2, free_port(), str(llama_folder), streamed, out), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):  # every rank holds the gathered result
        got = torch.load(f"{out}.rank{rank}")
        assert got["per_sequence"].shape == single.stats.per_sequence.shape
        assert torch.equal(got["per_sequence"][:, :, 0], single.stats.per_sequence[:, :, 0])
        # Each sequence's sums do not depend on its batch-mates, so only BLAS blocking on a different batch shape
        # can move them: a few float32 ulps, far below the 1e-3 effect of a misplaced sequence.
        torch.testing.assert_close(got["per_sequence"], single.stats.per_sequence, rtol=1e-5, atol=1e-9)
        for n, values in single.stats.span_angular.items():
            torch.testing.assert_close(got["span"][n], values, rtol=1e-5, atol=1e-9)
        for metric in SCORE_METRICS:
            assert got["rankings"][metric] == single.ranking(metric), metric


@pytest.mark.slow
def test_torchrun_cli_equals_single_process(tmp_path, smollm2):
    from shortgpt_fast.cli import main

    flags = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]
    single_out = tmp_path / "single.json"
    assert main(["score", "smollm2-135m", "--out", str(single_out)] + flags) == 0
    multi_out = tmp_path / "multi.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "shortgpt_fast",
         "score", "smollm2-135m", "--out", str(multi_out)] + flags,
        capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    single, multi = json.loads(single_out.read_text()), json.loads(multi_out.read_text())
    assert multi["ranking"] == single["ranking"]
    assert multi["tokens"] == single["tokens"] == 4 * 32
    for key in ("bi", "bi_ci95", "angular", "relative_magnitude"):
        torch.testing.assert_close(torch.tensor([layer[key] for layer in multi["layers"]]),
                                   torch.tensor([layer[key] for layer in single["layers"]]), rtol=1e-5, atol=1e-9)
