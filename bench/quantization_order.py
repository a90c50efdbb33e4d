"""Paper Table 5 on the embedded model: quantize -> score -> prune vs score -> prune -> quantize.

    .venv/bin/python bench/quantization_order.py        # bitsandbytes NF4 -> bench/results/quantization_order.json
    .venv/bin/python bench/quantization_order.py int4 bfloat16   # torchao int4 -> ..._int4_bfloat16.json

torch's CPU int4 kernel is fast for bfloat16 activations only (about 12x slower than float32 matmul with float32
ones), so int4 runs on CPU belong in bfloat16.

The same run from the command line (0.23 of 30 layers rounds to the 7 removed here):
    shortgpt-fast compare smollm2-135m --quantize-order nf4 --ratios 0.23 --samples 8 --seq-len 128 \
        --ppl-tokens 1024 --ppl-window 256 --out-dir quant-order
"""
import json
import sys
from pathlib import Path

from shortgpt_fast.api import load
from shortgpt_fast.experiments.quantize_order import format_order_table, quantization_order

method = sys.argv[1] if len(sys.argv) > 1 else "nf4"
dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
model, tokenizer = load("smollm2-135m", dtype=dtype)
result = quantization_order(model, tokenizer, remove=7, method=method, samples=8, seq_len=128, batch_size=8,
                            ppl_tokens=1024, ppl_window=256)
print(format_order_table(result))
print("same layers:", result["same_layers"])
# The NF4 file keeps its original name: the README's figures cite it.
name = "_".join(["quantization_order"] + [p for p in (method, dtype) if p not in ("nf4", "float32")]) + ".json"
out = Path(__file__).resolve().parent / "results" / name
out.write_text(json.dumps(result, indent=1, default=str))
print(f"wrote {out}")
