"""pytest-benchmark entry for checkpoint surgery: `pytest bench/test_bench_surgery.py --benchmark-enable`.

A small (~200 MB) generated checkpoint keeps this quick; bench/bench_surgery.py is the full comparison against
`cp -r` and load/save.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_surgery import generate_checkpoint  # noqa: E402

from shortgpt_fast.surgery.checkpoint import cut_checkpoint  # noqa: E402

LAYERS = 8
REMOVED = [5, 6]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src = tmp_path_factory.mktemp("bench") / "src"
    generate_checkpoint(src, hidden=1024, intermediate=2816, layers=LAYERS, vocab=16000, heads=8, kv_heads=4,
                        shard_bytes=64 << 20)
    return src


def test_bench_cut_copy(benchmark, checkpoint, tmp_path):
    counter = iter(range(10_000))

    def run():
        return cut_checkpoint(checkpoint, REMOVED, out=tmp_path / f"out{next(counter)}")

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(result.index_map) == LAYERS - len(REMOVED)


def test_bench_cut_in_place(benchmark, checkpoint, tmp_path):
    counter = iter(range(10_000))

    def setup():
        work = tmp_path / f"work{next(counter)}"
        shutil.copytree(checkpoint, work)
        return (work,), {}

    result = benchmark.pedantic(lambda work: cut_checkpoint(work, REMOVED, in_place=True), setup=setup, rounds=3)
    assert result.in_place


def test_bench_cp_r(benchmark, checkpoint, tmp_path):
    counter = iter(range(10_000))
    benchmark.pedantic(lambda: subprocess.run(["cp", "-r", str(checkpoint), str(tmp_path / f"cp{next(counter)}")],
                                              check=True), rounds=3, iterations=1)
