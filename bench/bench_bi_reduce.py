"""Throughput of the fused BI reduction against a read-bandwidth ceiling and plain torch, measured in one run.

    python bench/bench_bi_reduce.py                  # CPU: C++ kernel -> bench/results/bi_reduce_cpu.{json,png}
    python bench/bench_bi_reduce.py --device cuda    # GPU: Triton kernel -> bench/results/bi_reduce_gpu.json

GB/s is the bytes of both inputs divided by the median time. Every method is timed in interleaved rounds
(kernel, ceiling, torch, cosine, kernel, ...) so a noisy neighbour slows them all alike and the ratios hold.
The ceiling is an fp32 `sum` over the same number of bytes; on a GPU a large device-to-device copy is also
recorded (bytes read + written). The decoder-layer column is one forward of a randomly initialised
transformers LlamaDecoderLayer of the same width on the same tokens, in fp32.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = (576, 4096, 8192)
TOKENS = (2048, 32768)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_SHAPE = (8192, 4096)  # tokens x hidden, the shape the targets are stated at
# Decoder layers of real models at each width: SmolLM2-135M, Llama-2-7B, Llama-2-70B.
LAYER_SHAPES = {
    576: dict(intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    4096: dict(intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    8192: dict(intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def interleaved_medians(methods: dict, rounds: int, timer: Timer) -> dict:
    for fn in methods.values():  # warm-up: first-touch pages, JIT, autotuning
        fn()
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(timer(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def decoder_layer_flops(hidden: int, tokens: int) -> float:
    shape = LAYER_SHAPES[hidden]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * shape["intermediate_size"]
    causal_attention = 2 * tokens * tokens * hidden  # QK^T and PV, halved by the causal mask
    return 2 * params * tokens + causal_attention


def decoder_layer_seconds(hidden: int, tokens: int, device: str, budget_s: float, flops_per_s: float):
    """One forward of a random LlamaDecoderLayer, or (None, why) when it would take too long."""
    estimate = decoder_layer_flops(hidden, tokens) / flops_per_s
    if estimate > budget_s:
        return None, f"skipped: estimated {estimate:.0f} s at {flops_per_s / 1e9:.0f} GFLOP/s > budget {budget_s:.0f} s"
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=1, max_position_embeddings=max(tokens, 2048),
                         vocab_size=128, **LAYER_SHAPES[hidden])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device).eval()
    rotary = LlamaRotaryEmbedding(config).to(device)
    x = torch.randn(1, tokens, hidden, device=device)
    position_ids = torch.arange(tokens, device=device)[None]
    with torch.no_grad():
        cos_sin = rotary(x, position_ids)
        def run():
            return layer(x, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)

        timer = Timer(device)
        first = timer(run)
        seconds = first if first > 5.0 else min(first, timer(run))
    return seconds, f"{config.intermediate_size=}, heads={config.num_attention_heads}/{config.num_key_value_heads}, fp32"


def measure_flops(device: str) -> float:
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    timer = Timer(device)
    timer(lambda: a @ b)
    return 2 * n**3 / min(timer(lambda: a @ b) for _ in range(3))


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                                 if line.startswith("model name"))
        flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split())
        info["cpu_simd"] = sorted(f for f in flags if f in {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"})
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
        info["memory"] = meminfo.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        import triton

        info["triton"] = triton.__version__
    else:
        from shortgpt_fast.ops.bi_reduce import cpp as bi_reduce_cpp

        info["cpp_isas_available"] = bi_reduce_cpp.available_isas()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def bench_case(tokens, hidden, dtype_name, device, rounds, kernel, timer):
    from shortgpt_fast.ops import bi_reduce as bi

    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    x_in = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    x_out = (x_in.float() + 0.5 * torch.randn(tokens, hidden, generator=gen, device=device)).to(dtype)
    nbytes = 2 * x_in.numel() * x_in.element_size()
    ceiling_input = torch.randn(nbytes // 4, generator=gen, device=device)
    inputs = bi.validate(x_in, x_out, None, None, None)
    def cosine_similarity():
        return 1 - F.cosine_similarity(x_in, x_out, dim=-1).mean()

    methods = {
        "kernel": functools.partial(kernel, inputs),
        "read_ceiling_fp32_sum": ceiling_input.sum,
        "torch_backend": functools.partial(bi.torch_backend, inputs),
        "cosine_similarity": cosine_similarity,
    }
    seconds = interleaved_medians(methods, rounds, timer)
    result = {
        "tokens": tokens, "hidden": hidden, "dtype": dtype_name, "bytes": nbytes, "rounds": rounds,
        "seconds": seconds,
        "gb_per_s": {name: nbytes / s / 1e9 for name, s in seconds.items()},
    }
    result["kernel_fraction_of_ceiling"] = seconds["read_ceiling_fp32_sum"] / seconds["kernel"]
    result["speedup_vs_cosine_similarity"] = seconds["cosine_similarity"] / seconds["kernel"]
    result["speedup_vs_torch_backend"] = seconds["torch_backend"] / seconds["kernel"]
    return result


def copy_ceiling(device: str, timer: Timer, nbytes: int = 4 << 30) -> dict:
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, 10, timer)["copy"]
    return {"bytes_moved": 2 * nbytes, "gb_per_s": 2 * nbytes / seconds / 1e9}


def plot(results: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in results if not r.get("target_shape")]
    methods = ["read_ceiling_fp32_sum", "kernel", "torch_backend", "cosine_similarity"]
    fig, axes = plt.subplots(1, len(DTYPES), figsize=(13, 4.5), sharey=True)
    for ax, dtype_name in zip(axes, DTYPES):
        rows = [r for r in grid if r["dtype"] == dtype_name]
        labels = [f"{r['tokens']}x{r['hidden']}" for r in rows]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            ax.bar([x + i * width for x in range(len(rows))], [r["gb_per_s"][method] for r in rows], width,
                   label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, rotation=30)
        ax.set_yscale("log")
        ax.set_title(f"{dtype_name} inputs")
        ax.set_xlabel("tokens x hidden")
    axes[0].set_ylabel("GB/s (both inputs / median time)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, nargs="*", default=list(HIDDEN))
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--layer-budget-s", type=float, default=60.0,
                        help="skip a decoder-layer forward whose estimated time exceeds this")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = args.device
    timer = Timer(device)
    if device == "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "0")
        from shortgpt_fast.ops.bi_reduce import triton_kernel as bi_reduce_triton

        if bi_reduce_triton._TRITON_PROBLEM:
            raise SystemExit(bi_reduce_triton._TRITON_PROBLEM)
        kernel, kernel_name = bi_reduce_triton.run, "triton"
    else:
        from shortgpt_fast.ops.bi_reduce import cpp as bi_reduce_cpp

        if bi_reduce_cpp._EXTENSION_PROBLEM:
            raise SystemExit(bi_reduce_cpp._EXTENSION_PROBLEM)
        kernel, kernel_name = bi_reduce_cpp.run, "cpp"
    out = args.out or ROOT / "bench" / "results" / f"bi_reduce_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "kernel": kernel_name,
        "machine": machine_info(device),
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": __doc__,
        "results": [],
    }
    flops_per_s = measure_flops(device)
    report["matmul_gflops_fp32"] = flops_per_s / 1e9
    if device == "cuda":
        report["hbm_copy_ceiling"] = copy_ceiling(device, timer)

    cases = [(t, h, d, False) for h in args.hidden for t in args.tokens for d in DTYPES]
    cases += [(TARGET_SHAPE[0], TARGET_SHAPE[1], d, True) for d in DTYPES]
    layer_cache = {}
    for tokens, hidden, dtype_name, is_target in cases:
        # Few rounds where plain torch takes seconds per call; the kernel's own spread is small.
        rounds = args.rounds if tokens * hidden <= 2048 * 8192 else max(3, args.rounds // 2)
        result = bench_case(tokens, hidden, dtype_name, device, rounds, kernel, timer)
        result["target_shape"] = is_target
        if hidden in LAYER_SHAPES and not is_target:
            if (hidden, tokens) not in layer_cache:
                layer_cache[(hidden, tokens)] = decoder_layer_seconds(hidden, tokens, device, args.layer_budget_s,
                                                                      flops_per_s)
            layer_s, note = layer_cache[(hidden, tokens)]
            result["decoder_layer_forward_s"] = layer_s
            result["decoder_layer_note"] = note
            result["kernel_fraction_of_layer_forward"] = (
                result["seconds"]["kernel"] / layer_s if layer_s else None
            )
        report["results"].append(result)
        gbs = result["gb_per_s"]
        print(f"{tokens:>6}x{hidden:<5} {dtype_name}: {kernel_name} {gbs['kernel']:7.1f} GB/s | ceiling "
              f"{gbs['read_ceiling_fp32_sum']:6.1f} ({result['kernel_fraction_of_ceiling']:.0%}) | torch "
              f"{gbs['torch_backend']:5.2f} | cosine {gbs['cosine_similarity']:5.2f} "
              f"(x{result['speedup_vs_cosine_similarity']:.1f})"
              + (f" | {result['kernel_fraction_of_layer_forward']:.2%} of a layer forward"
                 if result.get("kernel_fraction_of_layer_forward") else ""), flush=True)

    targets = {r["dtype"]: r for r in report["results"] if r["target_shape"]}
    report["targets"] = {
        f"{d}_{TARGET_SHAPE[0]}x{TARGET_SHAPE[1]}": {
            "fraction_of_read_ceiling": r["kernel_fraction_of_ceiling"],
            "speedup_vs_cosine_similarity": r["speedup_vs_cosine_similarity"],
        }
        for d, r in targets.items()
    }
    if device == "cpu":
        report["targets"]["met"] = {
            "fraction_of_ceiling_ge_0.70_fp32_and_bf16": all(
                r["kernel_fraction_of_ceiling"] >= 0.70 for r in targets.values()),
            "bf16_speedup_vs_cosine_ge_10": targets["bf16"]["speedup_vs_cosine_similarity"] >= 10,
        }
    else:
        copy = report["hbm_copy_ceiling"]["gb_per_s"]
        report["targets"]["fraction_of_hbm_copy"] = {d: r["gb_per_s"]["kernel"] / copy for d, r in targets.items()}
    report["load_average_after"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=2) + "\n")
    if device == "cpu":
        plot(report["results"], out.with_suffix(".png"),
             f"bi_reduce on {report['machine'].get('cpu_model', 'CPU')}, {torch.get_num_threads()} threads")
    print(f"wrote {out}")
    print(json.dumps(report["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
