"""Giant-model streaming on a synthetic DeepSeek-V3-shaped FP8 MoE checkpoint whose blocks exceed the memory budget.

    nice -n 19 python bench/bench_giant.py                 # ~1.7 GB FP8 checkpoint, 1 GB budget (2 GB fp32 MoE blocks)
    nice -n 19 python bench/bench_giant.py --experts 64     # smaller, for a quick look

The checkpoint is written directly in DeepSeek-V3's safetensors layout (per-expert e4m3 weights, one float32
`weight_scale_inv` per 128x128 block, bf16 norms/embeddings/router, `quantization_config` fp8), scaled down in width
and depth, so it fits this disk; its MoE blocks are still several times the budget once dequantized to float32, so
each runs in expert groups. Two scoring passes in one child process report: peak RSS (VmHWM) against the budget, wall
time against max(read, dequantize + compute), the per-part times, and the routed experts' GFLOP/s against plain
torch.matmul on the same GEMM shapes in float32 and bfloat16, timed in the same run. Then the oracle: the same weights
dequantized up front by compressed-tensors, loaded by from_pretrained and scored in memory in float32, against a
streamed pass computing in float32 under the same budget. Writes bench/results/giant.json
and giant.png; bench/bench_giant_projection.py projects DeepSeek-V3 and Kimi-K2 from it.
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
sys.path.insert(0, str(HERE))
from bench_streamed import PEAK_RSS_PRELUDE  # noqa: E402

RESULTS = HERE / "results"
BLOCK = 128


def shape(experts: int) -> dict:
    """DeepSeek-V3 (hidden 7168, MLA, 256 experts of 2048, top-8, 1 shared, 3 dense layers) scaled to this disk."""
    return dict(vocab_size=8192, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=640,
                num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=experts, num_experts_per_tok=8,
                n_shared_experts=1, n_group=8, topk_group=4, num_attention_heads=16, num_key_value_heads=16,
                q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                head_dim=32, max_position_embeddings=4096, tie_word_embeddings=False, routed_scaling_factor=2.5)


def generate(folder: Path, config_kwargs: dict) -> dict:
    """Write the FP8 checkpoint shard by shard (one per layer); returns sizes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(**config_kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    weight_map, fp8_bytes, total = {}, 0, 0

    def fp8(rows: int, cols: int, fan_in: int):
        # Random e4m3 codes times per-block scales: values ~ N(0, 1/fan_in), as an initialised projection.
        q = (torch.randn(rows, cols, generator=gen) * 64).clamp_(-440, 440).to(torch.float8_e4m3fn)
        grid = (-(-rows // BLOCK), -(-cols // BLOCK))
        scale = (torch.rand(grid, generator=gen) * 0.5 + 0.75) / (64 * fan_in ** 0.5)
        return q, scale

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, folder / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    for i in range(config.num_hidden_layers):
        tensors = {}
        prefix = f"model.layers.{i}."
        for key, param in model.state_dict().items():
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            if local.endswith("experts.gate_up_proj") or local.endswith("experts.down_proj"):
                count, out, inp = param.shape
                base = key[: -len("gate_up_proj" if "gate_up" in local else "down_proj")]
                parts = (("gate_proj", out // 2), ("up_proj", out // 2)) if "gate_up" in local else (("down_proj", out),)
                for e in range(count):
                    for proj, rows in parts:
                        q, s = fp8(rows, inp, inp)
                        tensors[f"{base}{e}.{proj}.weight"] = q
                        tensors[f"{base}{e}.{proj}.weight_scale_inv"] = s
                        fp8_bytes += q.numel()
            elif param.dim() == 2 and local.endswith("proj.weight") or local.endswith("proj_with_mqa.weight"):
                q, s = fp8(*param.shape, param.shape[1])
                tensors[key], tensors[key.replace(".weight", ".weight_scale_inv")] = q, s
                fp8_bytes += q.numel()
            elif "norm" in local:
                tensors[key] = torch.ones(param.shape, dtype=torch.bfloat16)
            elif local.endswith("e_score_correction_bias"):
                tensors[key] = torch.zeros(param.shape, dtype=torch.float32)
            else:  # the router
                tensors[key] = (torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5).to(torch.bfloat16)
        shard(f"model-layer-{i:03d}.safetensors", tensors)
        del tensors
    outer = {}
    for key, param in model.state_dict().items():
        if ".layers." not in key:
            outer[key] = (torch.ones(param.shape) if "norm" in key
                          else torch.randn(param.shape, generator=gen) * 0.02).to(torch.bfloat16)
    shard("model-outer.safetensors", outer)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config_dict = config.to_dict()
    config_dict["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [BLOCK, BLOCK]}
    config_dict["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config_dict))
    return {"checkpoint_bytes": total, "fp8_bytes": fp8_bytes}


CHILD = PEAK_RSS_PRELUDE + r"""
from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed
# Imported before the baseline, so the peak above it is the pass's memory, not the libraries' code and tables.
import transformers.models.deepseek_v3.modeling_deepseek_v3
from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
from shortgpt_fast import _native
_native.load("the FP8 bench", needs="fp8_block_dequantize_to")

def resident():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

folder, samples, seq_len, batch, budget, compute = sys.argv[1:7]
ids = torch.randint(1, 8000, (int(samples), int(seq_len)), generator=torch.Generator().manual_seed(0))
calib = from_tensors(ids)
runs = []
# Twice in one process: the first pass also pays for what the libraries keep afterwards (oneDNN's JIT-compiled
# kernels and primitive cache, one per GEMM shape met, and heap they do not return), the second measures the pass.
for _ in range(2):
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = resident()
    began = time.perf_counter()
    stats = collect_layer_stats_streamed(folder, calib, batch_size=int(batch), progress=False,
                                         memory_budget=int(budget), compute_dtype=compute)
    wall = time.perf_counter() - began
    bi = (stats.per_sequence[:, :, 1].sum(1) / stats.per_sequence[:, :, 0].sum(1)).tolist()
    runs.append({"wall_s": wall, "peak_rss": high_water_mark(), "rss_before": before, "rss_after": resident(),
                 "bi": bi, **stats.streaming})
print(json.dumps(runs))
"""


ORACLE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed

fp8, dense, samples, seq_len, batch, budget = sys.argv[1:7]
ids = torch.randint(1, 8000, (int(samples), int(seq_len)), generator=torch.Generator().manual_seed(0))
calib = from_tensors(ids)

def bi(stats):
    return (stats.per_sequence[:, :, 1].sum(1) / stats.per_sequence[:, :, 0].sum(1)).tolist()

streamed = collect_layer_stats_streamed(fp8, calib, batch_size=int(batch), progress=False, memory_budget=int(budget),
                                        compute_dtype="float32")
model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
in_memory = collect_layer_stats(model, calib, batch_size=int(batch), progress=False)
print(json.dumps({"streamed_bi": bi(streamed), "in_memory_bi": bi(in_memory),
                  "blocks_in_parts": streamed.streaming["blocks_in_parts"],
                  "expert_groups": streamed.streaming["expert_groups"]}))
"""


def dequantize_up_front(folder: Path, out: Path) -> None:
    """The oracle's checkpoint: every FP8 weight dequantized to float32 by compressed-tensors' FP8BlockDequantizer (the
    library, not our kernel), everything else as stored, config.json without its quantization_config."""
    import torch
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        for scale_name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
            weight_name = scale_name[: -len("_scale_inv")]
            module = weight_name.rpartition(".")[0]
            library = FP8BlockDequantizer(targets=frozenset({module}), weight_block_size=(BLOCK, BLOCK),
                                          dtype=torch.float32)
            library._checkpoint_targets = frozenset({module})
            pair = {weight_name: tensors.pop(weight_name), scale_name: tensors.pop(scale_name)}
            tensors[weight_name] = library.process(pair)[weight_name]
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
        del tensors
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def matmul_rates(rows: int, hidden: int, inter: int, repeats: int = 5) -> dict:
    """GFLOP/s of plain torch.matmul for one expert's GEMMs (rows x hidden @ hidden x 2*inter, then rows x inter @
    inter x hidden) in float32 and bfloat16: the ceiling the streamed experts compute is compared with."""
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, hidden, dtype=dtype)
        w1 = torch.randn(hidden, 2 * inter, dtype=dtype)
        h = torch.randn(rows, inter, dtype=dtype)
        w2 = torch.randn(inter, hidden, dtype=dtype)
        torch.matmul(x, w1), torch.matmul(h, w2)
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            torch.matmul(x, w1)
            torch.matmul(h, w2)
            best = min(best, time.perf_counter() - began)
        out[str(dtype).replace("torch.", "")] = 2 * rows * 3 * hidden * inter / best / 1e9
    return out


def read_rate(folder: Path) -> float:
    """GB/s of reading every shard once in 64 MiB sequential reads (page cache warm after generation)."""
    total, began = 0, time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - began) / 1e9


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = results["run"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    parts = {"read": run["read_s"], "dequantize": run["dequantize_s"], "non-expert compute\n(run twice)":
             run["rest_compute_s"], "expert compute": run["experts_compute_s"], "wall": run["wall_s"]}
    left.barh(list(parts), list(parts.values()), color=["#888", "#c84", "#48c", "#26a", "#000"])
    left.set_xlabel("seconds")
    left.set_title(f"per-part time, {results['tokens']} tokens, {run['expert_groups']} expert groups")
    gb = 1e9
    warm = results["second_pass"]
    bars = {"memory budget": results["memory_budget"] / gb,
            "peak RSS growth\n(first pass)": (run["peak_rss"] - run["rss_before"]) / gb,
            "peak RSS growth\n(second pass)": (warm["peak_rss"] - warm["rss_before"]) / gb,
            "one MoE block (fp32)": results["moe_block_fp32_bytes"] / gb,
            "one MoE block (FP8 on disk)": results["moe_block_fp8_bytes"] / gb}
    right.bar(list(bars), list(bars.values()), color=["#4a4", "#c44", "#e88", "#888", "#bbb"])
    right.set_ylabel("GB")
    right.tick_params(axis="x", labelsize=7)
    right.set_title("memory")
    fig.suptitle(f"streamed FP8 MoE scoring ({results['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--no-oracle", action="store_true",
                        help="skip the in-memory run of the same weights dequantized up front (6.3 GB in float32)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-giant-", dir=args.workdir))
    try:
        kwargs = shape(args.experts)
        began = time.perf_counter()
        sizes = generate(workdir, kwargs)
        generate_s = time.perf_counter() - began
        read_gb_s = read_rate(workdir)
        budget = int(args.budget_gb * 1e9)
        env = dict(os.environ, TQDM_DISABLE="1")
        result = subprocess.run([sys.executable, "-c", CHILD, str(workdir), str(args.samples), str(args.seq_len),
                                 str(args.batch_size), str(budget), args.compute_dtype], capture_output=True,
                                text=True, env=env, cwd=HERE.parent)
        if result.returncode != 0:
            raise SystemExit(f"scoring failed:\n{result.stderr[-3000:]}")
        run, warm = json.loads(result.stdout.strip().splitlines()[-1])
        oracle = None
        if not args.no_oracle:
            dense = workdir / "dequantized"
            dequantize_up_front(workdir, dense)
            result = subprocess.run([sys.executable, "-c", ORACLE, str(workdir), str(dense), str(args.samples),
                                     str(args.seq_len), str(args.batch_size), str(budget)], capture_output=True,
                                    text=True, env=env, cwd=HERE.parent)
            if result.returncode != 0:
                raise SystemExit(f"the in-memory oracle failed:\n{result.stderr[-3000:]}")
            oracle = json.loads(result.stdout.strip().splitlines()[-1])
            oracle["max_relative_bi_difference"] = max(abs(a - b) / abs(b) for a, b in
                                                       zip(oracle["streamed_bi"], oracle["in_memory_bi"]))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if not run["blocks_in_parts"]:
        raise SystemExit(f"every block loaded whole under {args.budget_gb} GB, so nothing here measures expert "
                         "groups: lower --budget-gb")
    h, inter, experts, top_k = (kwargs["hidden_size"], kwargs["moe_intermediate_size"], args.experts,
                                kwargs["num_experts_per_tok"])
    tokens = args.samples * args.seq_len
    moe_layers = kwargs["num_hidden_layers"] - kwargs["first_k_dense_replace"]
    expert_params = 3 * h * inter
    routed_flops = 2 * tokens * top_k * expert_params * moe_layers
    ceiling = matmul_rates(max(1, tokens * top_k // experts), h, inter)
    streamed_gflops = routed_flops / run["experts_compute_s"] / 1e9
    compute_s = run["rest_compute_s"] + run["experts_compute_s"]
    results = {
        "kind": "measurement", "machine": machine(), "load_average_after": os.getloadavg(), "command": "nice -n 19 python bench/bench_giant.py "
        + " ".join(sys.argv[1:]), "shape": kwargs, "tokens": tokens, "memory_budget": budget,
        "generate_s": generate_s, **sizes,
        "moe_block_fp8_bytes": experts * expert_params, "moe_block_fp32_bytes": 4 * experts * expert_params,
        "read_every_shard_gb_per_s": read_gb_s, "run": run,
        "peak_rss_growth_over_budget": (run["peak_rss"] - run["rss_before"]) / budget,
        "retained_after_first_pass_bytes": run["rss_after"] - run["rss_before"],
        "second_pass": {k: warm[k] for k in ("wall_s", "peak_rss", "rss_before", "rss_after", "load_s", "read_s",
                                             "dequantize_s", "rest_compute_s", "experts_compute_s")},
        "second_pass_experts_fraction_of_faster_matmul": routed_flops / warm["experts_compute_s"] / 1e9
        / max(ceiling.values()),
        "second_pass_peak_rss_growth_over_budget": (warm["peak_rss"] - warm["rss_before"]) / budget,
        "second_pass_bi_equal": warm["bi"] == run["bi"],
        # Streamed with float32 compute against the model from_pretrained builds from the same weights dequantized up
        # front by compressed-tensors, scored in memory in float32.
        "in_memory_oracle": oracle,
        "wall_over_max_read_dequantize_compute": run["wall_s"] / max(run["read_s"], run["dequantize_s"] + compute_s),
        "dequantize_gelem_per_s": sizes["fp8_bytes"] / run["dequantize_s"] / 1e9,
        "routed_experts_gflops": streamed_gflops, "matmul_gflops_same_shapes": ceiling,
        "experts_fraction_of_faster_matmul": streamed_gflops / max(ceiling.values()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "giant.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "giant.png")
    print(json.dumps({k: v for k, v in results.items() if k not in ("run", "shape")}, indent=1))


if __name__ == "__main__":
    main()
