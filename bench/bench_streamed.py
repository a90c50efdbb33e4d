"""Streamed scoring against in-memory scoring: wall time, peak RSS, disk ceiling and block compute time.

    python bench/bench_streamed.py                      # ~1.3 GB generated Llama checkpoint + SmolLM2, both paths
    python bench/bench_streamed.py --preset llama2-13b  # ~26 GB bf16 checkpoint, streamed only (bigger than RAM)

Every measurement runs in its own subprocess so ru_maxrss is that run's peak alone. The shard read time is measured
by reading every shard once with large sequential reads; it is warm-cache unless the checkpoint is bigger than the
page cache, which the JSON states. Writes bench/results/streamed.json and bench/results/streamed.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

PRESETS = {
    # name: generate_checkpoint kwargs
    "small": dict(hidden=2048, intermediate=5632, layers=12, vocab=32000, heads=16, kv_heads=16),
    "llama2-13b": dict(hidden=5120, intermediate=13824, layers=40, vocab=32000, heads=40, kv_heads=40),
}

# The start of every child that measures a peak: a reset high-water mark, read back by high_water_mark().
PEAK_RSS_PRELUDE = """
import json, sys, time, torch
from shortgpt_fast.data.calibration import from_tensors

def high_water_mark():
    # VmHWM after a reset, not ru_maxrss: ru_maxrss keeps the parent's RSS at fork (2 GB after generating weights).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
"""

CHILD = PEAK_RSS_PRELUDE + """
mode, model, samples, seq_len, batch_size, dtype, compute = sys.argv[1:8]
compute = None if compute == "none" else compute
samples, seq_len, batch_size = int(samples), int(seq_len), int(batch_size)
ids = torch.randint(1, 30000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
if model == "smollm2-135m":
    ids = ids % 49000
calib = from_tensors(ids)
before = high_water_mark()
started = time.perf_counter()
info = {}
if mode == "streamed":
    from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed
    stats = collect_layer_stats_streamed(model, calib, batch_size=batch_size, dtype=dtype, progress=False,
                                         compute_dtype=compute)
    info = stats.streaming
else:
    from shortgpt_fast.models.loading import load_model, DTYPES, resolve_model_path
    from transformers import AutoModelForCausalLM
    net = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=DTYPES[dtype]).eval()
    info["load_s"] = time.perf_counter() - started
    from shortgpt_fast.scoring.block_influence import collect_layer_stats
    stats = collect_layer_stats(net, calib, batch_size=batch_size, progress=False)
    info["compute_s"] = stats.seconds
wall = time.perf_counter() - started
print(json.dumps({"wall_s": wall, "peak_rss": high_water_mark(),
                  "rss_before": before, "bi": (stats.per_sequence[:, :, 1].sum(1) / stats.per_sequence[:, :, 0].sum(1)).tolist(),
                  **{k: v for k, v in info.items() if not isinstance(v, str)}, "activations": info.get("activations")}))
"""


def run_child(mode: str, model: str, samples: int, seq_len: int, batch_size: int, dtype: str,
              compute_dtype: str = "none") -> dict:
    env = dict(os.environ, TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, "-c", CHILD, mode, model, str(samples), str(seq_len), str(batch_size),
                             dtype, compute_dtype], capture_output=True, text=True, env=env, cwd=HERE.parent)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run on {model} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_every_shard(folder: Path) -> dict:
    """Seconds to read each shard once, sequentially, in 64 MiB chunks: the I/O ceiling of a streamed pass."""
    chunk = bytearray(64 << 20)
    view = memoryview(chunk)
    total = 0
    started = time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    seconds = time.perf_counter() - started
    return {"read_s": seconds, "bytes": total, "gb_per_s": total / seconds / 1e9}


def page_cache_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, run) for name, run in results["runs"].items()]
    fig, (ax_time, ax_rss) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [name for name, _ in rows]
    ax_time.barh(labels, [run["wall_s"] for _, run in rows], color="tab:blue", label="wall")
    ax_time.barh(labels, [run.get("compute_s", 0) for _, run in rows], color="tab:orange", alpha=0.7,
                 label="block compute")
    for model, read in results["read_every_shard"].items():
        ax_time.axvline(read["read_s"], linestyle="--", color="grey")
        ax_time.text(read["read_s"], len(labels) - 0.6, f" read {model}", color="grey", fontsize=7)
    ax_time.set_xlabel("seconds")
    ax_time.legend(fontsize=8)
    ax_rss.barh(labels, [run["peak_rss"] / 2**30 for _, run in rows], color="tab:green")
    for model, size in results["checkpoint_bytes"].items():
        ax_rss.axvline(size / 2**30, linestyle=":", color="black")
        ax_rss.text(size / 2**30, 0, f" {model} checkpoint", fontsize=7, rotation=90)
    ax_rss.set_xlabel("peak RSS (GiB)")
    fig.suptitle(f"streamed vs in-memory scoring, {results['tokens']} tokens, {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from bench_surgery import generate_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the generated checkpoint goes (deleted afterwards)")
    parser.add_argument("--skip-in-memory", action="store_true", help="only streamed on the generated checkpoint")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--compute-dtype", default="none", choices=("none", "auto", "float32", "bfloat16"),
                        help="streamed runs' compute dtype (none: the activation dtype, as before the flag existed)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-streamed-", dir=args.workdir))
    folder = workdir / args.preset
    try:
        started = time.perf_counter()
        size = generate_checkpoint(folder, shard_bytes=2 << 30, **PRESETS[args.preset])
        results = {
            "machine": f"{os.cpu_count()} CPU, {page_cache_bytes() / 2**30:.0f} GiB RAM, {platform.machine()}",
            "preset": args.preset, "shape": PRESETS[args.preset], "tokens": args.samples * args.seq_len,
            "samples": args.samples, "seq_len": args.seq_len, "dtype": "bfloat16",
            "checkpoint_bytes": {args.preset: size}, "generate_s": time.perf_counter() - started,
            "read_every_shard": {args.preset: dict(read_every_shard(folder),
                                                   warm_cache=size < 0.8 * page_cache_bytes())},
            "runs": {},
        }
        runs = results["runs"]
        streamed_name = f"{args.preset} streamed" + ("" if args.compute_dtype == "none" else
                                                     f" (compute {args.compute_dtype})")
        runs[streamed_name] = run_child("streamed", str(folder), args.samples, args.seq_len, args.batch_size,
                                        "bfloat16", args.compute_dtype)
        if not args.skip_in_memory and size < 0.6 * page_cache_bytes():
            runs[f"{args.preset} in-memory"] = run_child("in-memory", str(folder), args.samples, args.seq_len,
                                                         args.batch_size, "bfloat16")
        if not args.skip_smollm2:
            from shortgpt_fast.models.loading import resolve_model_path

            smol = Path(resolve_model_path("smollm2-135m"))
            results["checkpoint_bytes"]["smollm2-135m"] = sum(p.stat().st_size for p in smol.glob("*.safetensors"))
            results["read_every_shard"]["smollm2-135m"] = dict(read_every_shard(smol), warm_cache=True)
            for mode in ("streamed", "in-memory"):
                runs[f"smollm2 {mode}"] = run_child(mode, "smollm2-135m", args.samples, args.seq_len,
                                                    args.batch_size, "float32")
        for name, run in runs.items():
            model = args.preset if name.startswith(args.preset) else "smollm2-135m"
            read = results["read_every_shard"][model]["read_s"]
            run["peak_rss_over_checkpoint"] = run["peak_rss"] / results["checkpoint_bytes"][model]
            if "streamed" in name:
                run["wall_over_max_read_compute"] = run["wall_s"] / max(read, run.get("compute_s", 0))
        pairs = [(f"{args.preset} streamed", f"{args.preset} in-memory"), ("smollm2 streamed", "smollm2 in-memory")]
        results["max_abs_bi_difference"] = {
            a: max(abs(x - y) for x, y in zip(runs[a]["bi"], runs[b]["bi"])) for a, b in pairs if a in runs and b in runs}
        for run in runs.values():
            run.pop("bi")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    stem = "streamed" if args.preset == "small" else f"streamed.{args.preset}"
    if args.compute_dtype != "none":
        stem += f".compute-{args.compute_dtype}"  # its own record: it may come from another machine than the base run
    previous = RESULTS / f"{stem}.json"
    if previous.exists() and (args.skip_in_memory or args.skip_smollm2):
        # A partial rerun replaces only the runs it made; the others stay from the earlier full run.
        old = json.loads(previous.read_text())
        for key in ("runs", "read_every_shard", "checkpoint_bytes", "max_abs_bi_difference"):
            results[key] = dict(old.get(key, {}), **results[key])
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{stem}.png")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
