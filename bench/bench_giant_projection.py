"""A projection, not a measurement: streamed scoring of DeepSeek-V3 (FP8) and Kimi-K2 (FP8) from measured rates.

The per-part rates come from bench/results/giant.json (the synthetic DeepSeek-V3-shaped FP8 run on this machine):
shard read GB/s, FP8 dequantization elements/s, routed-expert GFLOP/s and non-expert GFLOP/s. The model shapes are
the published ones. Each MoE layer costs max(read, dequantize + compute), the next part loading while this one
computes; the non-expert part runs twice (up to the experts call, then again with the experts' output). Two targets:

- this machine (2 CPU cores, 24 GB RAM), from the measured rates alone;
- one 80 GB GPU, whose read, dequantize and GEMM rates are *assumptions* (ASSUMED_GPU), since no GPU was measured.

    python bench/bench_giant_projection.py   # -> bench/results/giant_projection.json, a markdown table on stdout
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def mla_params(hidden: int, heads: int, q_lora: int = 1536, kv_lora: int = 512, nope: int = 128, rope: int = 64,
               v: int = 128) -> int:
    return (hidden * q_lora + q_lora * heads * (nope + rope) + hidden * (kv_lora + rope)
            + kv_lora * heads * (nope + v) + heads * v * hidden)


# Published shapes (config.json of deepseek-ai/DeepSeek-V3 and moonshotai/Kimi-K2-Instruct).
MODELS = {
    "DeepSeek-V3 (671B, FP8)": dict(layers=61, dense_layers=3, hidden=7168, dense_intermediate=18432, experts=256,
                                    shared=1, expert_intermediate=2048, top_k=8, attention=mla_params(7168, 128)),
    "Kimi-K2 (1T, FP8)": dict(layers=61, dense_layers=1, hidden=7168, dense_intermediate=18432, experts=384, shared=1,
                              expert_intermediate=2048, top_k=8, attention=mla_params(7168, 64)),
}
ASSUMED_GPU = {
    "name": "one 80 GB GPU (H100-class) + PCIe 4.0 NVMe",
    "read_gb_per_s": 7.0,  # sequential read of a PCIe 4.0 x4 NVMe drive
    "dequantize_gelem_per_s": 500.0,  # an elementwise fp8 -> bf16 scale pass, a fraction of 3 TB/s of HBM
    "expert_gflops": 200e3,  # small per-expert GEMMs: about 20% of dense bf16 peak
    "rest_gflops": 400e3,
    "memory_gb": 80.0,
    "compute_bytes": 2,  # bf16
}


def project(measured: dict) -> dict:
    run, shape = measured["run"], measured["shape"]
    tokens = measured["tokens"]
    h = shape["hidden_size"]
    moe_layers = shape["num_hidden_layers"] - shape["first_k_dense_replace"]
    heads, q_lora, kv_lora = shape["num_attention_heads"], shape["q_lora_rank"], shape["kv_lora_rank"]
    rest_params = (mla_params(h, heads, q_lora, kv_lora, shape["qk_nope_head_dim"], shape["qk_rope_head_dim"],
                              shape["v_head_dim"]) + 3 * h * shape["moe_intermediate_size"] * shape["n_shared_experts"])
    # The non-expert part of the measured MoE layers ran twice; dense layers' time is left out of both sides.
    rest_flops = 2 * tokens * rest_params * 2 * moe_layers
    cpu = {
        # The pass dequantizes straight from the mapped shard, so its page-ins count as dequantization; the read
        # rate is the same run's sequential read of every shard (page cache warm, as in the pass).
        "read_gb_per_s": measured["read_every_shard_gb_per_s"],
        "dequantize_gelem_per_s": measured["dequantize_gelem_per_s"],
        "expert_gflops": measured["routed_experts_gflops"],
        "rest_gflops": rest_flops / run["rest_compute_s"] / 1e9,
        "memory_gb": 24.0, "compute_bytes": 2 if run["compute_dtype"] in ("bfloat16", "float16") else 4,
    }
    targets = {"this machine (measured rates)": (cpu, (tokens,)),
               ASSUMED_GPU["name"] + " (assumed rates)": (ASSUMED_GPU, (tokens, 128 * 2048))}
    rows = []
    for model, m in MODELS.items():
        expert = 3 * m["hidden"] * m["expert_intermediate"]
        rest = m["attention"] + m["shared"] * expert + m["experts"] * m["hidden"]
        layer_fp8_gb = (m["experts"] * expert + rest) / 1e9
        moe = m["layers"] - m["dense_layers"]
        for target, (r, token_counts) in targets.items():
            # Default budget: 40% of memory for weights in flight; the block less its experts and two groups in it.
            budget_gb = 0.4 * r["memory_gb"]
            held_block_gb = (rest + m["experts"] * expert) * r["compute_bytes"] / 1e9
            parts = held_block_gb > budget_gb / 2
            for tokens_n in token_counts:
                read_s = layer_fp8_gb / r["read_gb_per_s"]
                dequantize_s = layer_fp8_gb / r["dequantize_gelem_per_s"]
                compute_s = (2 * tokens_n * m["top_k"] * expert / (r["expert_gflops"] * 1e9)
                             + 2 * tokens_n * rest * 2 / (r["rest_gflops"] * 1e9))
                per_layer = max(read_s, dequantize_s + compute_s)
                bound = "read" if read_s >= dequantize_s + compute_s else (
                    "dequantize" if dequantize_s >= compute_s else "compute")
                rows.append({
                    "model": model, "target": target, "tokens": tokens_n, "fp8_gb_per_layer": layer_fp8_gb,
                    "block_in_compute_dtype_gb": held_block_gb, "memory_budget_gb": budget_gb,
                    "experts_in_groups": parts, "read_s_per_layer": read_s, "dequantize_s_per_layer": dequantize_s,
                    "compute_s_per_layer": compute_s, "total_hours": moe * per_layer / 3600, "bound": bound,
                    "weights_held_gb": min(held_block_gb * 2, budget_gb),
                    "activations_gb": 2 * tokens_n * m["hidden"] * 4 / 1e9,
                })
    return {"kind": "projection, not a measurement", "from": "bench/results/giant.json", "measured_rates_cpu": cpu,
            "assumed_gpu": ASSUMED_GPU, "dense_layers_left_out": True, "rows": rows}


def _duration(seconds: float) -> str:
    # GPU rows take minutes, CPU rows hours: one unit for both printed 0.0 h for every GPU row.
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main() -> None:
    report = project(json.loads((RESULTS / "giant.json").read_text()))
    (RESULTS / "giant_projection.json").write_text(json.dumps(report, indent=1) + "\n")
    print("| model | target | tokens | FP8 GB/layer | read s | dequantize s | compute s | total | bound | weights held |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['model']} | {r['target']} | {r['tokens']:,} | {r['fp8_gb_per_layer']:.1f} | "
              f"{r['read_s_per_layer']:.1f} | {r['dequantize_s_per_layer']:.1f} | {r['compute_s_per_layer']:.1f} | "
              f"{_duration(r['total_hours'] * 3600)} | {r['bound']} | {r['weights_held_gb']:.0f} GB"
              f"{' (experts in groups)' if r['experts_in_groups'] else ''} |")


if __name__ == "__main__":
    main()
