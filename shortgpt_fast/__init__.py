"""shortgpt_fast: find and remove redundant layers of large language models by Block Influence (ShortGPT).

    import shortgpt_fast as sf
    model, tok = sf.load("smollm2-135m")
    scores = sf.score(model, None, tokenizer=tok, samples=16, seq_len=128)  # None: the embedded Shakespeare corpus
    sf.prune(model, scores.select("bi", 8))                      # in memory, proven against the original
    sf.cut("ckpt/", scores.select("bi", 8), out="ckpt-pruned/")  # on disk, without loading the model

The names below are loaded on first use, so `import shortgpt_fast` stays light (the `cut` command never imports
torch).
"""
__version__ = "0.1.0"

_EXPORTS = {
    "load": "api", "calibration_set": "api", "score": "api", "prune": "api", "cut": "api", "prune_to_dir": "api",
    "Scores": "scoring.report", "CalibrationSet": "data.calibration", "bi_reduce": "ops.bi_reduce",
    "ShortGPTError": "errors", "register_metric": "scoring.metrics",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shortgpt_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
