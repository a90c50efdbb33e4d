"""Time the GGUF cut of an 8B-shaped quantized GGUF against `cp` and a gguf-py rewrite, with each one's peak RSS.

    nice -n 19 python bench/bench_gguf.py                 # ~8.5 GB Q8_0 Llama-3-8B shape, 8 of 32 layers removed
    nice -n 19 python bench/bench_gguf.py --layers 8      # a smaller stand-in when the disk is short

The model is generated (random Q8_0 blocks: the cut never decodes them, so their values do not matter) with the
exact Llama-3-8B tensor set and sizes, so every layer is a whole number of 4 KiB blocks as in real files. Methods,
each run as its own process so its peak RSS (wait4's ru_maxrss) is its own:
  - cp:           `cp SRC DST`, the machine's copy ceiling for the whole file;
  - copy:         cut_gguf(out=...), the cut written to a new file;
  - in place:     cut_gguf(in_place=True) on a fresh copy (collapse-range where the filesystem has it);
  - gguf-py:      GGUFReader + GGUFWriter writing the same kept tensors, renamed, with the edited metadata (what
                  llama.cpp's gguf-py scripts and PR #22485 do).
Throughput is source bytes / seconds, each method timed until its output is durable (the cut fsyncs; cp and the
gguf-py rewrite are followed by `sync FILE`). Page cache is not dropped (the machine is shared), so every method reads a
warm source; the ratios hold, absolute GB/s is the warm-cache figure. Results: bench/results/gguf_cut.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Llama-3-8B: (name, numpy shape (rows, cols)); cols is the contiguous dimension.
HIDDEN, FFN, KV, VOCAB = 4096, 14336, 1024, 128256
LAYER = [("attn_norm.weight", (HIDDEN,)), ("attn_q.weight", (HIDDEN, HIDDEN)), ("attn_k.weight", (KV, HIDDEN)),
         ("attn_v.weight", (KV, HIDDEN)), ("attn_output.weight", (HIDDEN, HIDDEN)), ("ffn_norm.weight", (HIDDEN,)),
         ("ffn_gate.weight", (FFN, HIDDEN)), ("ffn_up.weight", (FFN, HIDDEN)), ("ffn_down.weight", (HIDDEN, FFN))]
F32, Q8_0 = 0, 8


def nbytes(shape, qtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * 4 if qtype == F32 else n // 32 * 34


def generate(path: Path, layers: int) -> int:
    """Write the model with this package's own header writer and a repeated random chunk; returns its size."""
    from shortgpt_fast.io.gguf import ARRAY, STRING, U32
    from shortgpt_fast.surgery.gguf_cut import _C

    tensors = [("token_embd.weight", (VOCAB, HIDDEN), Q8_0)]
    for i in range(layers):
        tensors += [(f"blk.{i}.{n}", s, F32 if len(s) == 1 else Q8_0) for n, s in LAYER]
    tensors += [("output_norm.weight", (HIDDEN,), F32), ("output.weight", (VOCAB, HIDDEN), Q8_0)]
    records = [_C.gguf_encode_record("general.architecture", STRING, 0, "llama"),
               _C.gguf_encode_record("general.name", STRING, 0, "bench 8B-shaped Q8_0"),
               _C.gguf_encode_record("llama.block_count", U32, 0, layers),
               _C.gguf_encode_record("llama.embedding_length", U32, 0, HIDDEN),
               _C.gguf_encode_record("llama.feed_forward_length", ARRAY, U32, [FFN] * layers),
               _C.gguf_encode_record("llama.attention.head_count", U32, 0, 32),
               _C.gguf_encode_record("llama.attention.head_count_kv", U32, 0, 8)]
    infos, offset = [], 0
    for name, shape, qtype in tensors:
        infos.append((name, list(reversed(shape)), qtype, offset))
        offset += -(-nbytes(shape, qtype) // 32) * 32
    header = _C.gguf_render_header(3, records, infos, 32)
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as f:
        f.write(header)
        left = offset
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
    return len(header) + offset


GGUF_PY_REWRITE = r"""
import sys
from gguf import GGUFReader, GGUFWriter, GGUFValueType
src, dst, removed = sys.argv[1], sys.argv[2], {int(x) for x in sys.argv[3].split(",")}
r = GGUFReader(src)
n = int(r.fields["llama.block_count"].parts[-1][0])
kept = [i for i in range(n) if i not in removed]
new = {old: j for j, old in enumerate(kept)}
w = GGUFWriter(dst, "llama")
for name, f in r.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        values = [f.parts[i].tolist()[0] for i in f.data]
        if len(values) == n:
            values = [values[i] for i in kept]
        w.add_array(name, values)
    elif t == GGUFValueType.STRING:
        w.add_string(name, bytes(f.parts[-1]).decode())
    else:
        value = f.parts[-1].tolist()[0]
        w.add_key_value(name, len(kept) if name == "llama.block_count" else value, t)
for t in r.tensors:
    name = t.name
    if name.startswith("blk."):
        i = int(name.split(".")[1])
        if i in removed:
            continue
        name = f"blk.{new[i]}." + name.split(".", 2)[2]
    w.add_tensor(name, t.data, raw_dtype=t.tensor_type)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"""

CUT = r"""
import sys
from shortgpt_fast.surgery.gguf_cut import cut_gguf
if sys.argv[2] == "--in-place":
    r = cut_gguf(sys.argv[1], sys.argv[3], in_place=True, check=False)
else:
    r = cut_gguf(sys.argv[1], sys.argv[3], out=sys.argv[2])
print(r.method, r.part_kinds)
"""


def run_child(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, last stdout line) of one child process."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["PYTHONPATH"] = str(ROOT)
                os.dup2(out.fileno(), 1)
                os.execvp(cmd[0], cmd)
            finally:
                os._exit(127)
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} exited with status {status}")
    return seconds, usage.ru_maxrss * 1024, lines[-1] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dir", default=str(ROOT / "bench" / ".gguf_bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated model for a rerun")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "model.gguf"
    removed = list(range(args.layers - 1 - args.layers // 4, args.layers - 1))  # 25%, the usual late block
    layers = ",".join(map(str, removed))
    need = 3 * (1 + args.layers * 0.27) * 1e9
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"needs about {need / 1e9:.0f} GB free in {work}, has {free / 1e9:.0f} GB; pass --layers "
                         "with fewer layers")
    if not src.exists():
        t = time.perf_counter()
        size = generate(src, args.layers)
        print(f"generated {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    size = src.stat().st_size
    py = sys.executable
    results: dict[str, tuple[float, int, str]] = {}

    def clean(*paths):
        for p in paths:
            if p.exists():
                p.unlink()

    # warm the source once so every method reads it from the same (warm) cache
    subprocess.run(["sh", "-c", 'cat "$0" > /dev/null', str(src)], check=True)
    out = work / "out.gguf"
    clean(out)
    # cp and the gguf-py rewrite are followed by `sync FILE` so that, like the cut (which fsyncs), they are timed
    # until the result is durable.
    results["cp"] = run_child(["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(out)])
    clean(out)
    results["copy"] = run_child([py, "-c", CUT, str(src), str(out), layers])
    clean(out)
    inplace = work / "inplace.gguf"
    clean(inplace)
    subprocess.run(["cp", str(src), str(inplace)], check=True)
    subprocess.run(["sync", str(inplace)], check=True)  # its writeback must not be billed to the cut
    results["in place"] = run_child([py, "-c", CUT, str(inplace), "--in-place", layers])
    kept_size = inplace.stat().st_size
    clean(inplace)
    results["gguf-py rewrite"] = run_child(["sh", "-c", '"$0" -c "$1" "$2" "$3" "$4" && sync "$3"', py,
                                            GGUF_PY_REWRITE, str(src), str(out), layers])
    clean(out)
    if not args.keep:
        clean(src)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "filesystem": subprocess.run(["df", "-T", str(work)], capture_output=True,
                                                 text=True).stdout.splitlines()[-1].split()[1]},
        "model": {"shape": "Llama-3-8B", "quant": "Q8_0 (norms F32)", "layers": args.layers, "bytes": size,
                  "removed": removed, "bytes_after": kept_size},
        "cache": "warm (page cache not dropped on a shared machine)",
        "methods": {name: {"seconds": round(t, 3), "GB_per_s": round(size / t / 1e9, 3), "peak_rss_MB":
                           round(rss / 2**20, 1), **({"engine": said} if said else {})}
                    for name, (t, rss, said) in results.items()},
    }
    m = report["methods"]
    report["ratios"] = {
        "in_place_speedup_vs_gguf_py": round(m["gguf-py rewrite"]["seconds"] / m["in place"]["seconds"], 1),
        "copy_throughput_vs_cp": round(m["cp"]["seconds"] / m["copy"]["seconds"], 3),
        "copy_speedup_vs_gguf_py": round(m["gguf-py rewrite"]["seconds"] / m["copy"]["seconds"], 2),
    }
    report["goals"] = {"in place >= 20x gguf-py": report["ratios"]["in_place_speedup_vs_gguf_py"] >= 20,
                       "copy >= 0.9x cp": report["ratios"]["copy_throughput_vs_cp"] >= 0.9,
                       "peak RSS <= 256 MB (copy and in place)":
                           max(m["copy"]["peak_rss_MB"], m["in place"]["peak_rss_MB"]) <= 256}
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "gguf_cut.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(m)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.barh(names, [m[n]["seconds"] for n in names], color=["gray", "tab:blue", "tab:green", "tab:red"])
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds (log)")
    ax1.set_title(f"cut {len(removed)} of {args.layers} layers, {size / 1e9:.1f} GB Q8_0")
    ax2.barh(names, [m[n]["peak_rss_MB"] for n in names], color=["gray", "tab:blue", "tab:green", "tab:red"])
    ax2.set_xscale("log")
    ax2.set_xlabel("peak RSS, MB (log)")
    fig.suptitle(f"GGUF cut, {report['machine']['cpus']} CPUs, {report['machine']['filesystem']}, warm cache")
    fig.tight_layout()
    fig.savefig(results_dir / "gguf_cut.png", dpi=120)


if __name__ == "__main__":
    main()
