"""FP8 block dequantization on CPU: our C++ kernel against torch's cast, compressed-tensors, and a copy ceiling.

    python bench/bench_dequant_fp8.py   # -> bench/results/dequant_fp8.{json,png}

Shapes are DeepSeek-V3's (hidden 7168, expert width 2048, 128x128 blocks). Every method is timed in interleaved
rounds (ours, torch, library, ceilings, ours, ...) so a noisy neighbour slows them all alike; the table reports
medians and ratios from the same run. Two ceilings: torch's float32 `copy_` into an already-allocated buffer (the
kernel must at least write 4 bytes per element), and the same copy into a freshly allocated one, which is what any
dequantizer returning a new tensor pays: above glibc's mmap threshold every new buffer is fresh pages, and faulting
them in costs more than the arithmetic.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from shortgpt_fast.ops.dequant_fp8 import (  # noqa: E402
    fp8_block_dequantize,
    fp8_block_dequantize_reference,
    scale_grid,
    why_not_native,
)

SHAPES = {"expert gate/up (2048 x 7168)": (2048, 7168), "expert down (7168 x 2048)": (7168, 2048),
          "kv_a_proj_with_mqa (576 x 7168)": (576, 7168)}
BLOCK = (128, 128)
ROUNDS = 7


def main() -> None:
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    reasons = why_not_native(torch.zeros(1, 1, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (1, 1))
    if reasons:
        raise SystemExit(reasons[0])
    library = FP8BlockDequantizer(targets=frozenset({"m"}), weight_block_size=BLOCK, dtype=torch.float32)
    library._checkpoint_targets = frozenset({"m"})
    rows_out = [measure(label, shape, library) for label, shape in SHAPES.items()]
    report = {"command": "python bench/bench_dequant_fp8.py", "machine": {
        "platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "block": list(BLOCK), "rounds": ROUNDS, "rows": rows_out}
    results = ROOT / "bench" / "results"
    (results / "dequant_fp8.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(rows_out, results / "dequant_fp8.png")
    print("| shape | ours | torch | compressed-tensors | copy ceiling | fresh-buffer ceiling | ours vs torch | "
          "ours / fresh-buffer ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        g = r["G_elements_per_s"]
        print(f"| {r['shape']} | {g['ours (C++)']:.2f} | {g['torch cast x scale']:.2f} | {g['compressed-tensors']:.2f} "
              f"| {g['ceiling: fp32 copy_']:.2f} | {g['ceiling: fresh fp32 buffer']:.2f} | {r['ours_vs_torch']:.1f}x | "
              f"{r['ours_fraction_of_fresh_buffer_ceiling']:.0%} |")


def measure(label: str, shape: tuple, library) -> dict:
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(scale_grid(shape, BLOCK), generator=g)
    out, src = torch.empty(shape), torch.empty(shape)
    methods = {
        "ours (C++)": lambda: fp8_block_dequantize(weight, scale, BLOCK),
        "torch cast x scale": lambda: fp8_block_dequantize_reference(weight, scale, BLOCK),
        "compressed-tensors": lambda: library.process({"m.weight": weight, "m.weight_scale_inv": scale}),
        "ceiling: fp32 copy_": lambda: out.copy_(src),
        "ceiling: fresh fp32 buffer": lambda: torch.empty(shape).copy_(src),
    }
    assert torch.equal(methods["ours (C++)"](), methods["torch cast x scale"]())
    times = {name: [] for name in methods}
    for _ in range(ROUNDS):
        for name, fn in methods.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    elements = shape[0] * shape[1]
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": label, "elements": elements,
        "G_elements_per_s": {name: elements / s / 1e9 for name, s in medians.items()},
        "ours_vs_torch": medians["torch cast x scale"] / medians["ours (C++)"],
        "ours_vs_compressed_tensors": medians["compressed-tensors"] / medians["ours (C++)"],
        "ours_fraction_of_ceiling": medians["ceiling: fp32 copy_"] / medians["ours (C++)"],
        "ours_fraction_of_fresh_buffer_ceiling": medians["ceiling: fresh fp32 buffer"] / medians["ours (C++)"],
    }


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["G_elements_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar([i + k * width for i in range(len(rows))], [r["G_elements_per_s"][name] for r in rows], width,
               label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["shape"] for r in rows], fontsize=8)
    ax.set_ylabel("G elements / s (median)")
    ax.set_title("FP8 128x128 block dequantization to float32, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
