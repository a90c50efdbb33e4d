"""The paper's experiments this repo lacked, on the embedded SmolLM2-135M (CPU, run under `nice -n 19`):

    .venv/bin/python bench/paper_experiments.py laco        # LaCo beside BI -> bench/results/compare_laco_smollm2/
    .venv/bin/python bench/paper_experiments.py mmlu        # MMLU 5-shot, dense vs BI -> .../mmlu_smollm2/
    .venv/bin/python bench/paper_experiments.py generation  # generation collapse -> .../generation_collapse.json

`laco` and `mmlu` are `shortgpt-fast compare` runs (the equivalent command is stored in each compare.json);
`generation` greedily continues the four fixed prompts with the dense model, with the 8 BI-chosen layers (ratio
0.25) removed, and in ShortGPT-gen mode over the same layers.
"""
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = dict(samples=32, seq_len=256, batch_size=8, seed=0, progress=False)


def machine() -> dict:
    return {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def compare_run(name: str, command: str, **kwargs) -> None:
    from shortgpt_fast.experiments.compare import compare_to_dir

    out = RESULTS / name
    compare_to_dir("smollm2-135m", out, score_kwargs=CALIB, **kwargs)
    table = json.loads((out / "compare.json").read_text())
    table.update(command=command, machine=machine())
    (out / "compare.json").write_text(json.dumps(table, indent=1))


def generation() -> None:
    from shortgpt_fast import api
    from shortgpt_fast.evaluation.generation import generation_collapse
    from shortgpt_fast.scoring.report import layers_for_ratio

    started = time.perf_counter()
    model, tokenizer = api.load("smollm2-135m")
    scores = api.score(model, None, tokenizer=tokenizer, **CALIB)
    removed = scores.select("bi", layers_for_ratio(scores.num_layers, 0.25))
    result = generation_collapse(model, tokenizer, removed, max_new_tokens=32)
    result.update(command="python bench/paper_experiments.py generation", machine=machine(),
                  calibration=scores.calibration, seconds=round(time.perf_counter() - started, 1))
    (RESULTS / "generation_collapse.json").write_text(json.dumps(result, indent=1))
    for mode in ("dense", "removal", "shortgpt_gen"):
        print(mode, {k: round(v, 3) for k, v in result[mode]["mean"].items()})
        for sample in result[mode]["samples"]:
            print("   ", repr(sample["prompt"]), "->", repr(sample["continuation"]))


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else ""
    eval_common = dict(ppl_tokens=4096, ppl_window=512, ppl_stride=None, batch_size=8, data_dir=None, progress=False)
    if part == "laco":
        compare_run("compare_laco_smollm2", "shortgpt-fast compare smollm2-135m --ratios 0,0.1,0.25 --methods bi,laco "
                    "--tasks piqa,arc_easy --limit 100 --quiet --out-dir bench/results/compare_laco_smollm2",
                    ratios=[0, 0.1, 0.25], methods=["bi", "laco"],
                    eval_kwargs=dict(eval_common, ppl="wikitext2", tasks=["piqa", "arc_easy"], limit=100))
    elif part == "mmlu":
        compare_run("mmlu_smollm2", "shortgpt-fast compare smollm2-135m --ratios 0,0.25 --methods bi "
                    "--tasks mmlu_local --limit 3 --ppl none --quiet --out-dir bench/results/mmlu_smollm2",
                    ratios=[0, 0.25], methods=["bi"],
                    eval_kwargs=dict(eval_common, ppl=None, tasks=["mmlu_local"], limit=3))
    elif part == "generation":
        generation()
    else:
        sys.exit(__doc__)
