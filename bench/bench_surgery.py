"""Time `cut_checkpoint` against the machine's copy ceiling (`cp -r`) and the usual load -> delete -> save_pretrained.

Generates a synthetic Llama-shaped bf16 checkpoint (random weights, real tensor names and shapes, several shards),
cuts 25% of its layers every way, and records wall time and peak RSS of each method, each in its own subprocess so
the numbers do not leak into one another. Writes bench/results/surgery.json and surgery.png.

    python bench/bench_surgery.py                      # ~1.3 GB checkpoint
    python bench/bench_surgery.py --preset llama3-8b --repeats 2 --skip-naive-repeats  # Llama-3-8B, 16 GB
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

RESULTS = Path(__file__).resolve().parent / "results"


def generate_checkpoint(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                        kv_heads: int, shard_bytes: int) -> int:
    """Write a Llama checkpoint with transformers' own sharded layout; tensors are streamed, never all in RAM."""
    import torch
    directory.mkdir(parents=True)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)

    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    # Drawing 8-13 billion normals costs more than the whole benchmark, so every tensor is a window into one 256 MB
    # pool of N(0, 0.02) bf16 values at a random offset: each tensor is still random-looking, non-degenerate data,
    # and the file is written at disk speed with a fixed amount of memory. The layout is safetensors' own (8-byte
    # length, JSON header padded to 8 with spaces, tensors in name order for one dtype), which the safetensors reader
    # in the cut's --verify, transformers and mergekit all read back.
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(128 << 20, generator=generator) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
    pool = memoryview(pool.tobytes() * 2)  # doubled so any window up to the pool size is one slice
    rng = torch.Generator().manual_seed(1)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        entries, offset = {}, 0
        for name in sorted(group):
            nbytes = 2 * int(torch.Size(shapes[name]).numel())
            entries[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        half = len(pool) // 2
        with open(directory / shard, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for name in sorted(group):
                remaining = entries[name]["data_offsets"][1] - entries[name]["data_offsets"][0]
                while remaining:
                    start = int(torch.randint(0, half // 2, (1,), generator=rng)) * 2
                    take = min(remaining, half)
                    f.write(pool[start:start + take])
                    remaining -= take
        total += offset
        weight_map.update({n: shard for n in group})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.json").write_text("{}")
    return total


_CHILD = {
    "cut_copy": "from shortgpt_fast.surgery.checkpoint import cut_checkpoint\n"
                "cut_checkpoint(SRC, LAYERS, out=DST)",
    "cut_in_place": "from shortgpt_fast.surgery.checkpoint import cut_checkpoint\n"
                    "cut_checkpoint(SRC, LAYERS, in_place=True)",
    "cut_copy_readwrite": "from shortgpt_fast.surgery.checkpoint import cut_checkpoint\n"
                          "cut_checkpoint(SRC, LAYERS, out=DST, copy_method='readwrite')",
    "load_delete_save": "import torch\n"
                        "from transformers import AutoModelForCausalLM\n"
                        "from shortgpt_fast.surgery.in_memory import prune_model\n"
                        "model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)\n"
                        "prune_model(model, LAYERS)\n"
                        "model.save_pretrained(DST, max_shard_size='500MB')",
}

_WRAPPER = """
import json, resource, sys, time
SRC, DST, LAYERS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
{imports}
def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # peak (VmHWM) restarts at the post-import RSS
base = rss_mb("VmRSS")
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
peak = rss_mb("VmHWM")
print(json.dumps({{"seconds": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": base,
                  "peak_rss_growth_mb": peak - base}}))
"""


def _run_python(method: str, src: Path, dst: Path, layers: list[int]) -> dict:
    code = _CHILD[method].split("\n")
    # Imports happen before the clock starts: interpreter and torch start-up are not what is being compared.
    imports = "\n".join(line for line in code if line.startswith(("import", "from")))
    body = "\n".join(line for line in code if not line.startswith(("import", "from")))
    script = _WRAPPER.format(imports=imports, body=body)
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(dst), json.dumps(layers)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_cp(src: Path, dst: Path, then_sync: bool = False) -> dict:
    # GNU time reports cp's own peak; getrusage(RUSAGE_CHILDREN) would count the pages a fork shares with this
    # (torch-importing) parent.
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "cp", "-r", str(src), str(dst)], check=True,
                          capture_output=True, text=True)
    if then_sync:
        # The cut fsyncs what it writes before renaming it into place; `cp -r && sync` is the like-for-like ceiling.
        subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    peak = int(proc.stderr.strip().splitlines()[-1]) / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": 0.0, "peak_rss_growth_mb": peak}


def _run_mergekit(mergekit_yaml: str, src: Path, dst: Path, layers: int, removed: list[int], workdir: Path) -> dict:
    # mergekit's passthrough is the community's way to drop layers without writing code: it decodes every kept
    # tensor and writes it again. Its slices are half-open layer ranges around the removed block.
    kept, start = [], 0
    for i in sorted(removed) + [layers]:
        if i > start:
            kept.append((start, i))
        start = i + 1
    slices = "".join(f"  - sources:\n      - model: {src}\n        layer_range: [{a}, {b}]\n" for a, b in kept)
    config = workdir / "mergekit_passthrough.yml"
    config.write_text(f"slices:\n{slices}merge_method: passthrough\ndtype: bfloat16\n")
    start_time = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", mergekit_yaml, str(config), str(dst), "--no-copy-tokenizer",
                           "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start_time
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed: {proc.stderr[-2000:]}")
    peak = int(proc.stderr.strip().splitlines()[-1]) / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": 0.0, "peak_rss_growth_mb": peak,
            "note": "includes mergekit's interpreter and torch start-up (a separate program)"}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _drop_from_cache(path: Path) -> None:
    # Warm-cache timing is what the NOTES figures use; we keep the cache warm but flush dirty pages so one method's
    # writeback does not land in the next one's time.
    subprocess.run(["sync"], check=True)


def run(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_surgery_"))
    src = workdir / "src"
    if src.exists():
        shutil.rmtree(src)
    total = generate_checkpoint(src, args.hidden, args.intermediate, args.layers, args.vocab, args.heads,
                                args.kv_heads, args.shard_mb << 20)
    removed = list(range(args.layers - 1 - args.layers // 4, args.layers - 1))  # 25%, ShortGPT-style deep layers
    size = _dir_bytes(src)
    methods = ["cp_r", "cp_r_sync", "cut_copy", "cut_copy_readwrite", "cut_in_place"] + ([] if args.skip_naive else
                                                                            ["load_delete_save"])
    if args.mergekit:
        methods.append("mergekit_passthrough")
    results = {m: [] for m in methods}
    for rep in range(args.repeats):
        for method in methods:
            dst = workdir / f"out_{method}"
            if dst.exists():
                shutil.rmtree(dst)
            _drop_from_cache(src)
            if method == "mergekit_passthrough":
                if rep > 0 and args.skip_naive_repeats:
                    continue
                r = _run_mergekit(args.mergekit, src, dst, args.layers, removed, workdir)
            elif method in ("cp_r", "cp_r_sync"):
                r = _run_cp(src, dst, then_sync=method == "cp_r_sync")
            elif method == "load_delete_save" and rep > 0 and args.skip_naive_repeats:
                continue
            elif method == "cut_in_place":
                shutil.copytree(src, dst)  # the in-place cut edits this copy; the copy itself is not timed
                _drop_from_cache(dst)
                r = _run_python(method, dst, dst, removed)
            else:
                r = _run_python(method, src, dst, removed)
            r["output_bytes"] = _dir_bytes(dst)
            results[method].append(r)
            print(f"rep {rep} {method:20s} {r['seconds']:8.3f} s  peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(+{r['peak_rss_growth_mb']:.0f} MB over imports)", flush=True)
            shutil.rmtree(dst)

    best = {m: min(results[m], key=lambda r: r["seconds"]) for m in methods}
    ratios = {
        "cp_seconds_over_cut_copy_seconds": best["cp_r"]["seconds"] / best["cut_copy"]["seconds"],
        "cut_copy_throughput_vs_cp": (best["cut_copy"]["output_bytes"] / best["cut_copy"]["seconds"]) /
                                     (best["cp_r"]["output_bytes"] / best["cp_r"]["seconds"]),
        "cp_sync_seconds_over_cut_copy_seconds": best["cp_r_sync"]["seconds"] / best["cut_copy"]["seconds"],
        "cut_copy_throughput_vs_cp_sync": (best["cut_copy"]["output_bytes"] / best["cut_copy"]["seconds"]) /
                                          (best["cp_r_sync"]["output_bytes"] / best["cp_r_sync"]["seconds"]),
        "cp_sync_seconds_over_cut_in_place_seconds": best["cp_r_sync"]["seconds"] / best["cut_in_place"]["seconds"],
    }
    if "load_delete_save" in best:
        ratios["load_save_over_cut_in_place"] = best["load_delete_save"]["seconds"] / best["cut_in_place"]["seconds"]
        ratios["load_save_over_cut_copy"] = best["load_delete_save"]["seconds"] / best["cut_copy"]["seconds"]
    if "mergekit_passthrough" in best:
        ratios["mergekit_over_cut_in_place"] = best["mergekit_passthrough"]["seconds"] / best["cut_in_place"]["seconds"]
        ratios["mergekit_over_cut_copy"] = best["mergekit_passthrough"]["seconds"] / best["cut_copy"]["seconds"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "filesystem": subprocess.run(["stat", "-f", "-c", "%T", str(workdir)], capture_output=True,
                                                 text=True).stdout.strip()},
        "checkpoint": {"bytes": size, "tensor_bytes": total, "layers": args.layers, "hidden": args.hidden,
                       "intermediate": args.intermediate, "vocab": args.vocab,
                       "shards": len(list(src.glob("*.safetensors"))), "removed_layers": removed},
        "cache": "warm page cache, `sync` before each run",
        "repeats": args.repeats,
        "runs": results,
        "best": best,
        "ratios": ratios,
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["best"])
    seconds = [report["best"][m]["seconds"] for m in labels]
    rss = [report["best"][m]["peak_rss_growth_mb"] for m in labels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.barh(labels, seconds, color="tab:blue")
    ax1.set_xlabel("wall time (s, best of %d)" % report["repeats"])
    ax1.set_xscale("log")
    for y, s in enumerate(seconds):
        ax1.text(s, y, f" {s:.2f}s", va="center")
    ax2.barh(labels, rss, color="tab:orange")
    ax2.set_xlabel("peak RSS above the interpreter + imports (MB)")
    for y, r in enumerate(rss):
        ax2.text(r, y, f" {r:.0f}", va="center")
    ck = report["checkpoint"]
    fig.suptitle(f"Cut {len(ck['removed_layers'])}/{ck['layers']} layers from a {ck['bytes'] / 1e9:.2f} GB "
                 f"{ck['shards']}-shard bf16 checkpoint ({report['machine']['cpus']} CPUs, "
                 f"{report['machine']['filesystem']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Llama-3-8B: 16 GB of bf16 in ~5 GB shards, as published.
PRESETS = {"llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8,
                             shard_mb=4900)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--shard-mb", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-naive", action="store_true", help="skip transformers load -> delete -> save_pretrained")
    p.add_argument("--workdir", help="where to generate the checkpoint (default: a temp dir, removed afterwards)")
    p.add_argument("--out", default=str(RESULTS / "surgery.json"))
    p.add_argument("--preset", choices=sorted(PRESETS), help="a real model's shape; overrides the size flags")
    p.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                   help="mergekit-yaml executable to time its passthrough merge (default: the one on PATH, if any)")
    p.add_argument("--skip-naive-repeats", action="store_true",
                   help="run load/save and mergekit once, not --repeats times (they take minutes at 16 GB)")
    args = p.parse_args(argv)
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["ratios"], indent=2))
    return report


if __name__ == "__main__":
    main()
