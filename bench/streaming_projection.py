"""A projection, not a measurement: streamed scoring time and memory for Llama-3-70B and a 400B MoE.

The per-layer rates come from the measured 26 GB Llama-2-13B run (bench/results/streamed.llama2-13b.json): how fast
this machine read the shards and how many FLOP/s the blocks ran at. The model shapes are the published ones. A
streamed pass is bounded by max(read, compute) per layer, because the next block loads while this one computes; the
13B run reached 1.05 x max(read, compute). Two targets are projected:

- this machine (2 CPU cores, 24 GB RAM, its disk), from the measured rates alone;
- one 80 GB GPU with an NVMe drive, where the compute and read rates are *assumptions* stated in ASSUMED_GPU, since
  no GPU was measured.

    python bench/streaming_projection.py   # -> bench/results/streaming_projection.json, a markdown table on stdout
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Published shapes. Parameters per layer are what one streamed block loads; active ones are what a token computes.
MODELS = {
    "Llama-3-70B": dict(layers=80, hidden=8192, params_per_layer=(2 * 8192 * 8192 + 2 * 1024 * 8192)
                        + 3 * 8192 * 28672, active_per_layer=None),
    # Llama-4-Maverick-like: 400B total, 17B active, 48 layers; the per-layer figure is the average, the largest
    # (MoE) layers are about twice it, which is what bounds memory.
    "400B MoE (17B active, 48 layers)": dict(layers=48, hidden=5120, params_per_layer=400e9 / 48,
                                             active_per_layer=17e9 / 48, largest_layer_factor=2.0),
}

ASSUMED_GPU = {
    "name": "one 80 GB GPU (H100-class) + PCIe 4.0 NVMe",
    "read_gb_per_s": 7.0,  # sequential read of a PCIe 4.0 x4 NVMe drive
    "bf16_tflops": 400.0,  # about 40% of an H100 SXM's dense bf16 peak, typical for one block's GEMMs at this size
    "memory_gb": 80.0,
}
TOKEN_BUDGETS = (256, 128 * 2048)  # the measured run's 256, and a larger calibration (128 sequences x 2048 tokens)


def project(measured: dict) -> dict:
    run = measured["runs"]["llama2-13b streamed"]
    shape = measured["shape"]
    h, inter = shape["hidden"], shape["intermediate"]
    params_13b_layer = 4 * h * h + 3 * h * inter
    measured_flops = 2 * params_13b_layer * measured["tokens"] * run["num_layers"] / run["compute_s"]
    measured_read = measured["read_every_shard"]["llama2-13b"]["gb_per_s"]
    blocks_resident = (run["peak_rss"] - run["rss_before"]) / (2 * params_13b_layer)
    rates = {
        "this machine (measured rates)": dict(read_gb_per_s=measured_read, flops=measured_flops, memory_gb=24.0),
        ASSUMED_GPU["name"] + " (assumed rates)": dict(read_gb_per_s=ASSUMED_GPU["read_gb_per_s"],
                                                     flops=ASSUMED_GPU["bf16_tflops"] * 1e12,
                                                     memory_gb=ASSUMED_GPU["memory_gb"]),
    }
    rows = []
    for model, m in MODELS.items():
        layer_gb = 2 * m["params_per_layer"] / 1e9
        active = m["active_per_layer"] or m["params_per_layer"]
        largest_gb = layer_gb * m.get("largest_layer_factor", 1.0)
        for target, r in rates.items():
            # The large budget would take this CPU weeks; it is projected for the GPU only.
            for tokens in TOKEN_BUDGETS if r["memory_gb"] > 24 else TOKEN_BUDGETS[:1]:
                read_s = layer_gb / r["read_gb_per_s"]
                compute_s = 2 * active * tokens / r["flops"]
                activations_gb = 2 * tokens * m["hidden"] * 4 / 1e9  # fp32 input and output of the block
                # Scaled from the measured run: its peak above the interpreter and torch, in 13B blocks (the
                # computing one, the prefetched one, load buffers and the embeddings), applied to the largest layer.
                memory_gb = blocks_resident * largest_gb + activations_gb
                rows.append({
                    "model": model, "target": target, "tokens": tokens, "layer_gb": layer_gb,
                    "read_s_per_layer": read_s, "compute_s_per_layer": compute_s,
                    "total_minutes": m["layers"] * max(read_s, compute_s) / 60,
                    "bound": "read" if read_s >= compute_s else "compute",
                    "resident_gb": memory_gb, "fits": memory_gb <= r["memory_gb"],
                })
    return {"kind": "projection, not a measurement", "from": "bench/results/streamed.llama2-13b.json",
            "measured": {"read_gb_per_s": measured_read, "block_gflops": measured_flops / 1e9,
                         "wall_over_max_read_compute": run["wall_over_max_read_compute"],
                         "peak_rss_in_blocks": blocks_resident},
            "assumed_gpu": ASSUMED_GPU, "rows": rows}


def main() -> None:
    measured = json.loads((RESULTS / "streamed.llama2-13b.json").read_text())
    report = project(measured)
    (RESULTS / "streaming_projection.json").write_text(json.dumps(report, indent=1) + "\n")
    print("| model | target | tokens | GB/layer | read s/layer | compute s/layer | total | bound | resident |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        total = f"{r['total_minutes']:.0f} min" if r["total_minutes"] >= 1 else f"{r['total_minutes'] * 60:.0f} s"
        print(f"| {r['model']} | {r['target']} | {r['tokens']:,} | {r['layer_gb']:.2f} | {r['read_s_per_layer']:.2f} "
              f"| {r['compute_s_per_layer']:.2f} | {total} | {r['bound']} | {r['resident_gb']:.1f} GB"
              f"{'' if r['fits'] else ' (does not fit)'} |")


if __name__ == "__main__":
    main()
