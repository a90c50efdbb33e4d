"""Streamed scoring of a GGUF model bigger than RAM once dequantized: a generated Llama-2-13B-shaped Q4_K file.

    nice -n 19 python bench/bench_gguf_streamed.py        # -> bench/results/gguf_streamed.{json,png}
    python bench/bench_gguf_streamed.py --layers 4        # a quick look

The file is written with this package's own GGUF header writer: every weight matrix Q4_K (random 4-bit codes and
6-bit scales, the two f16 super-block scales fixed so the weights are centred and small), norms F32 ones. Its bf16
size (what an unquantized checkpoint of it would take) is 26 GB and its float32 size 52 GB, against 24 GB of RAM.
The scoring runs in a child process (peak RSS from VmHWM after a reset), `compute_dtype="auto"` (float32 blocks on
a CPU without native BF16), and reports where the time went: reading, gguf-py's dequantization, block compute.
The read ceiling is one sequential read of the whole file, timed after the scoring run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_streamed import PEAK_RSS_PRELUDE  # noqa: E402

HIDDEN, FFN, VOCAB, HEADS = 5120, 13824, 32000, 40  # Llama-2-13B
F32, Q4_K = 0, 12
Q4_K_BLOCK, Q4_K_BYTES = 256, 144
LAYER = [("attn_norm.weight", (HIDDEN,)), ("attn_q.weight", (HIDDEN, HIDDEN)), ("attn_k.weight", (HIDDEN, HIDDEN)),
         ("attn_v.weight", (HIDDEN, HIDDEN)), ("attn_output.weight", (HIDDEN, HIDDEN)), ("ffn_norm.weight", (HIDDEN,)),
         ("ffn_gate.weight", (FFN, HIDDEN)), ("ffn_up.weight", (FFN, HIDDEN)), ("ffn_down.weight", (HIDDEN, FFN))]

CHILD = PEAK_RSS_PRELUDE + r"""
from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed
path, samples, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = torch.randint(1, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
before = high_water_mark()
started = time.perf_counter()
stats = collect_layer_stats_streamed(path, from_tensors(ids), batch_size=samples, dtype="bfloat16",
                                     compute_dtype="auto", progress=False)
wall = time.perf_counter() - started
bi = (stats.per_sequence[:, :, 1].sum(1) / stats.per_sequence[:, :, 0].sum(1)).tolist()
print(json.dumps({"wall_s": wall, "peak_rss": high_water_mark(), "rss_before": before, "bi": bi,
                  **{k: v for k, v in stats.streaming.items() if not isinstance(v, (list, dict))}}))
"""


def q4_k_bytes(shape) -> int:
    rows, cols = shape
    return rows * cols // Q4_K_BLOCK * Q4_K_BYTES


def q4_k_chunk(nbytes: int, rng: np.random.Generator) -> bytes:
    """Random Q4_K super-blocks whose f16 scales d and dmin are fixed: with codes 0..15 and 6-bit scales/mins
    uniform, E[d * sc * q] = 236 d and E[dmin * m] = 31.5 dmin, so dmin = 7.5 d centres the weights."""
    blocks = rng.integers(0, 256, size=(nbytes // Q4_K_BYTES, Q4_K_BYTES), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(1.5e-3).tobytes(), np.uint8)
    return blocks.tobytes()


def generate(path: Path, layers: int) -> dict:
    from shortgpt_fast.io.gguf import F32 as F32_VALUE
    from shortgpt_fast.io.gguf import STRING, U32
    from shortgpt_fast.surgery.gguf_cut import _C

    tensors = [("token_embd.weight", (VOCAB, HIDDEN), Q4_K)]
    for i in range(layers):
        tensors += [(f"blk.{i}.{n}", s, F32 if len(s) == 1 else Q4_K) for n, s in LAYER]
    tensors += [("output_norm.weight", (HIDDEN,), F32), ("output.weight", (VOCAB, HIDDEN), Q4_K)]
    records = [_C.gguf_encode_record("general.architecture", STRING, 0, "llama"),
               _C.gguf_encode_record("general.name", STRING, 0, "bench 13B-shaped Q4_K"),
               _C.gguf_encode_record("llama.block_count", U32, 0, layers),
               _C.gguf_encode_record("llama.context_length", U32, 0, 4096),
               _C.gguf_encode_record("llama.embedding_length", U32, 0, HIDDEN),
               _C.gguf_encode_record("llama.feed_forward_length", U32, 0, FFN),
               _C.gguf_encode_record("llama.attention.head_count", U32, 0, HEADS),
               _C.gguf_encode_record("llama.attention.head_count_kv", U32, 0, HEADS),
               _C.gguf_encode_record("llama.rope.dimension_count", U32, 0, HIDDEN // HEADS),
               _C.gguf_encode_record("llama.rope.freq_base", F32_VALUE, 0, 10000.0),
               _C.gguf_encode_record("llama.attention.layer_norm_rms_epsilon", F32_VALUE, 0, 1e-5),
               _C.gguf_encode_record("llama.vocab_size", U32, 0, VOCAB)]
    infos, offset, sizes = [], 0, []
    for name, shape, qtype in tensors:
        size = shape[0] * 4 if qtype == F32 else q4_k_bytes(shape)
        infos.append((name, list(reversed(shape)), qtype, offset))
        sizes.append((shape, qtype, size))
        offset += -(-size // 32) * 32
    header = _C.gguf_render_header(3, records, infos, 32)
    rng = np.random.default_rng(0)
    ones = np.ones(HIDDEN, np.float32).tobytes()
    chunk = q4_k_chunk(Q4_K_BYTES * (64 << 20) // Q4_K_BYTES, rng)
    with open(path, "wb") as f:
        f.write(header)
        for _, qtype, size in sizes:
            if qtype == F32:
                f.write(ones)
            else:
                left = size
                while left > 0:
                    f.write(chunk[:min(left, len(chunk))])
                    left -= min(left, len(chunk))
            f.write(b"\0" * (-(-size // 32) * 32 - size))
    params = sum(s[0] * (s[1] if len(s) > 1 else 1) for s, _, _ in sizes)
    return {"bytes": len(header) + offset, "parameters": params, "bf16_bytes": 2 * params, "float32_bytes": 4 * params}


def read_once(path: Path) -> dict:
    chunk = memoryview(bytearray(64 << 20))
    started, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(chunk):
            total += n
    seconds = time.perf_counter() - started
    return {"read_s": seconds, "gb_per_s": total / seconds / 1e9}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = report["run"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.5))
    parts = {"wall": run["wall_s"], "block compute": run["compute_s"], "gguf-py dequantize": run.get("dequantize_s", 0),
             "read (in the pass)": run.get("read_s", 0), "read ceiling (one pass)": report["read_once"]["read_s"]}
    ax_t.barh(list(parts), list(parts.values()), color=["tab:blue", "tab:orange", "tab:red", "tab:grey", "black"])
    ax_t.set_xlabel("seconds")
    sizes = {"peak RSS": run["peak_rss"], "GGUF file": report["model"]["bytes"],
             "bf16 size": report["model"]["bf16_bytes"], "RAM": report["ram_bytes"]}
    ax_m.barh(list(sizes), [v / 2**30 for v in sizes.values()], color="tab:green")
    ax_m.set_xlabel("GiB")
    fig.suptitle(f"streamed scoring of a {report['model']['layers']}-layer 13B-shaped Q4_K GGUF, "
                 f"{report['tokens']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-streamed-", dir=args.workdir) as tmp:
        path = Path(tmp) / "llama2-13b-shaped.Q4_K.gguf"
        started = time.perf_counter()
        model = dict(generate(path, args.layers), layers=args.layers)
        generated_s = time.perf_counter() - started
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.samples), str(args.seq_len)],
                             capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"))
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        run = json.loads(out.stdout.strip().splitlines()[-1])
        once = read_once(path)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    bi = run.pop("bi")
    report = {
        "command": "nice -n 19 python bench/bench_gguf_streamed.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": model, "generate_s": generated_s, "tokens": args.samples * args.seq_len, "ram_bytes": ram,
        "run": run, "read_once": once, "bi_finite": all(b == b for b in bi),
        "peak_rss_over_bf16_size": run["peak_rss"] / model["bf16_bytes"],
        "wall_over_max_read_compute": run["wall_s"] / max(once["read_s"], run["compute_s"]),
        "wall_over_max_read_dequantize_compute": run["wall_s"] / max(
            once["read_s"], run.get("dequantize_s", 0) + run["compute_s"]),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "gguf_streamed" if args.layers == 40 else f"gguf_streamed.{args.layers}layers"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / f"{stem}.png")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
