"""Paper Table 5 on the embedded model: quantize -> score -> prune vs score -> prune -> quantize (bitsandbytes NF4).

    .venv/bin/python bench/quantization_order.py   # -> bench/results/quantization_order.json
"""
import json
from pathlib import Path

from shortgpt_fast.api import load
from shortgpt_fast.evaluation.quantize import format_order_table, quantization_order

model, tokenizer = load("smollm2-135m")
result = quantization_order(model, tokenizer, remove=7, samples=8, seq_len=128, batch_size=8, ppl_tokens=1024,
                            ppl_window=256)
print(format_order_table(result))
print("same layers:", result["same_layers"])
out = Path(__file__).resolve().parent / "results" / "quantization_order.json"
out.write_text(json.dumps(result, indent=1, default=str))
print(f"wrote {out}")
