"""Measurements of an in-memory model: perplexity, lm-eval tasks, throughput, generation, and `evaluate` over them."""
from ..errors import ShortGPTError


class EvaluationError(ShortGPTError):
    """Bad evaluation input: a missing data folder or text, an unknown task, an impossible window."""
