"""Issue #12: every causal-LM model type transformers ships, through the whole path, against the identity oracle.

One test per matrix row, so pytest-xdist spreads the ~200 rows over its workers. Each row's outcome must be ✔ in
every step, or the refusal/failure/untested reason listed in EXPECTED for that (row, step). A WRONG cell (the model
ran but computes something other than the original with the removed blocks as identity) can never be expected:
it always fails. An expectation that no longer matches fails too, so the list shrinks as fixes land. Each row
also checks its own line of the README table, which is how the README stays equal to the measured matrix without
running the matrix twice.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from shortgpt_fast.models import support_matrix
from shortgpt_fast.models.support_matrix import NOT_APPLICABLE, PASS, SKIPPED, STEPS, cell_kind

README = Path(__file__).resolve().parents[1] / "README.md"

# (row, step) -> a substring of the cell, for every cell that is not ✔ today. step "build" is the whole row
# being untested. Regenerate the candidates with `shortgpt-fast archs`; never add a WRONG cell here.
EXPECTED: dict[tuple[str, str], str] = {
}


def _expected_cells(name: str) -> dict[str, str]:
    return {step: text for (row, step), text in EXPECTED.items() if row == name}


def test_every_causal_lm_type_has_a_row():
    rows = support_matrix.rows()
    assert set(support_matrix.causal_lm_types()) <= {r.model_type for r in rows.values()}
    # The older config forms of issue #12 stay in the matrix as their own rows.
    for variant in ("gemma3_text (sliding_window_pattern)", "cohere2 (sliding_window_pattern)",
                    "qwen3_next (full_attention_interval)", "kimi_linear (linear_attn_config)",
                    "falcon_h1 (5 layers)"):
        assert variant in rows
    assert all(len(r.remove) == support_matrix.REMOVE for r in rows.values())


def test_expectations_name_real_rows_and_steps():
    rows = support_matrix.rows()
    for (name, step), text in EXPECTED.items():
        assert name in rows, f"EXPECTED names {name!r}, which is not a matrix row"
        assert step in STEPS + ("build",), f"EXPECTED names step {step!r} of {name}"
        assert not text.startswith("WRONG"), "a silent mismatch is never an expected outcome"


@pytest.mark.parametrize("name", list(support_matrix.rows()))
def test_model_type_through_the_whole_path(name):
    result = support_matrix.run_model_type(name)
    expected = _expected_cells(name)
    problems = {}
    if result.untested is not None:
        if "build" not in expected or expected["build"] not in result.untested:
            problems["build"] = result.untested
    else:
        if "build" in expected:
            problems["build"] = f"builds now; drop the untested expectation {expected['build']!r}"
        assert set(result.steps) == set(STEPS), "every step must report, none may vanish"
        for step in STEPS:
            got = result.steps[step]
            if cell_kind(got) == "wrong":
                problems[step] = got
            elif step in expected:
                if got == PASS or expected[step] not in got:
                    problems[step] = f"{got!r}; EXPECTED says {expected[step]!r}"
            elif got not in (PASS, SKIPPED, NOT_APPLICABLE) and not got.startswith("as before prune:"):
                problems[step] = got
    assert not problems, f"{name}: {problems}"
    in_readme = support_matrix.readme_rows(README.read_text()).get(name)
    assert in_readme == support_matrix.format_row(result), (
        "README's architecture table is stale for this row; regenerate it with "
        "`shortgpt-fast archs --write-readme README.md`")


def test_readme_table_has_exactly_the_matrix_rows_in_order():
    table = support_matrix.readme_table(README.read_text())
    lines = table.splitlines()
    assert lines[0].startswith("Measured with transformers ")
    assert lines[2] == "| " + " | ".join(support_matrix.HEADER) + " |"
    assert list(support_matrix.readme_rows(README.read_text())) == list(support_matrix.rows())


def test_a_silent_mismatch_is_reported_as_wrong(monkeypatch):
    # A pruner that removes the wrong layer still produces a loadable model with the right layer count: only the
    # oracle can tell, and the matrix must say so loudly rather than as a refusal or a generic failure.
    from shortgpt_fast.surgery import in_memory

    real = in_memory.prune_model
    monkeypatch.setattr(in_memory, "prune_model", lambda model, layers: real(model, [i + 1 for i in layers]))
    result = support_matrix.run_model_type("llama")
    assert result.steps["prune"].startswith("WRONG: pruned in memory: max Δ")
    assert result.outcome == "WRONG"
    assert result.steps["cut"] == PASS  # the checkpoint path did not use the broken pruner


def test_a_refusal_and_a_failure_are_told_apart(monkeypatch):
    from shortgpt_fast.models.config_surgery import ConfigSurgeryError

    def refuse(*args, **kwargs):
        raise ConfigSurgeryError("cannot express field 'x' after removal\nsecond line")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("shortgpt_fast.surgery.in_memory.prune_model", refuse)
    monkeypatch.setattr("shortgpt_fast.surgery.checkpoint.cut_checkpoint", crash)
    result = support_matrix.run_model_type("gpt2")
    assert result.steps["prune"] == "refused: cannot express field 'x' after removal"
    assert result.steps["reload"] == "needs prune"
    assert result.steps["generate"] == "needs prune"
    assert result.steps["cut"] == "OSError: disk full"
    assert result.steps["score"] == PASS
    assert result.outcome == "fail"


def test_a_type_that_cannot_be_built_is_listed_as_untested(monkeypatch):
    from shortgpt_fast.models import tiny_configs

    monkeypatch.setitem(tiny_configs.OVERRIDES, "cohere", {"hidden_act": "no_such_activation"})
    result = support_matrix.run_model_type("cohere")
    assert result.outcome == "untested"
    assert result.untested.startswith("untested: model: KeyError"), result.untested
    assert result.row()[1] == result.untested and result.row()[2:] == [""] * len(STEPS)
