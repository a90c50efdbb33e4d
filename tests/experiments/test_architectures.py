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

from shortgpt_fast.experiments import support_matrix
from shortgpt_fast.experiments.support_matrix import NOT_APPLICABLE, PASS, SKIPPED, STEPS, cell_kind

README = Path(__file__).resolve().parents[2] / "README.md"

# (row, step) -> a substring of the cell, for every cell that is not ✔ today. step "build" is the whole row
# being untested. Regenerate the candidates with `shortgpt-fast archs`; never add a WRONG cell here.
EXPECTED: dict[tuple[str, str], str] = {
    ('bart', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('bart', 'reload'): 'needs prune',
    ('bart', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('bart', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('bart', 'generate'): 'needs prune',
    ('beam', 'prune'): 'refused: layer 2 (new index 1) would change: <root>.attn_residual_add_id',
    ('beam', 'reload'): 'needs prune',
    ('beam', 'cut'): 'refused: layer 2 (new index 1) would change: <root>.attn_residual_add_id',
    ('beam', 'cut in-place'): 'refused: layer 2 (new index 1) would change: <root>.attn_residual_add_id',
    ('beam', 'generate'): 'needs prune',
    ('bigbird_pegasus', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('bigbird_pegasus', 'reload'): 'needs prune',
    ('bigbird_pegasus', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('bigbird_pegasus', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('bigbird_pegasus', 'generate'): 'needs prune',
    ('blenderbot', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('blenderbot', 'reload'): 'needs prune',
    ('blenderbot', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('blenderbot', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('blenderbot', 'generate'): 'needs prune',
    ('blenderbot-small', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('blenderbot-small', 'reload'): 'needs prune',
    ('blenderbot-small', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('blenderbot-small', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('blenderbot-small', 'generate'): 'needs prune',
    ('blt', "build"): 'untested: 96.2 M parameters even when shrunk (limit 3 M)',
    ('cohere_compass_text', "build"): "untested: model: KeyError: 'full_attention'",
    ('cpmant', 'score'): "refused: layer 0's hidden state has shape [3, 45, 32], which is not one",
    ('dbrx', "build"): "untested: model: AttributeError: 'DbrxAttentionConfig' object has no att",
    ('diffllama', 'prune'): 'refused: layer 2 (new index 1) would change: self_attn.lambda_init chang',
    ('diffllama', 'reload'): 'needs prune',
    ('diffllama', 'cut'): 'refused: layer 2 (new index 1) would change: self_attn.lambda_init chang',
    ('diffllama', 'cut in-place'): 'refused: layer 2 (new index 1) would change: self_attn.lambda_init chang',
    ('diffllama', 'generate'): 'needs prune',
    ('dory', 'score'): 'refused: layer 2 of model.layers runs more than once per forward pass',
    ('dory', 'prune'): "refused: transformers cannot build a 'dory' config",
    ('dory', 'reload'): 'needs prune',
    ('dory', 'cut'): 'refused: cannot tell which tensors belong to the 12 layers',
    ('dory', 'cut in-place'): 'refused: cannot tell which tensors belong to the 12 layers',
    ('dory', 'generate'): 'needs prune',
    ('dots3_note', "build"): 'untested: config: StrictDataclassClassValidationError: ValueError: adapt',
    ('gemma3n', "build"): 'untested: model: ImportError: `pip install timm`. Please note that you m',
    ('gemma3n_text', 'prune'): 'refused: layer 2 (new index 1) would change: self_attn.store_full_length',
    ('gemma3n_text', 'reload'): 'needs prune',
    ('gemma3n_text', 'cut'): 'refused: layer 2 (new index 1) would change: self_attn.store_full_length',
    ('gemma3n_text', 'cut in-place'): 'refused: layer 2 (new index 1) would change: self_attn.store_full_length',
    ('gemma3n_text', 'generate'): 'needs prune',
    ('gemma4', 'prune'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4', 'reload'): 'needs prune',
    ('gemma4', 'cut'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4', 'cut in-place'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4', 'generate'): 'needs prune',
    ('gemma4_assistant', "build"): 'untested: config: StrictDataclassClassValidationError: ValueError: hidde',
    ('gemma4_text', 'prune'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_text', 'reload'): 'needs prune',
    ('gemma4_text', 'cut'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_text', 'cut in-place'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_text', 'generate'): 'needs prune',
    ('gemma4_unified', 'prune'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_unified', 'reload'): 'needs prune',
    ('gemma4_unified', 'cut'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_unified', 'cut in-place'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_unified', 'generate'): 'needs prune',
    ('gemma4_unified_assistant', "build"): 'untested: model: ValueError: The set of layer types producing a cache is',
    ('gemma4_unified_text', 'prune'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_unified_text', 'reload'): 'needs prune',
    ('gemma4_unified_text', 'cut'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_unified_text', 'cut in-place'): 'refused: layer 3 (new index 2) would change: self_attn.store_full_length',
    ('gemma4_unified_text', 'generate'): 'needs prune',
    ('hrm_text', 'score'): 'refused: layer 0 of model.L_module.layers runs more than once per f',
    ('hrm_text', 'prune'): 'refused: the pruned config builds 16 layers, expected 14 (16 minus 2 rem',
    ('hrm_text', 'reload'): 'needs prune',
    ('hrm_text', 'cut'): 'refused: cannot tell which tensors belong to the 6 layers: prefixes with',
    ('hrm_text', 'cut in-place'): 'refused: cannot tell which tensors belong to the 6 layers: prefixes with',
    ('hrm_text', 'generate'): 'needs prune',
    ('hy_v4', 'prune'): "refused: config field 'indexer_types': layer 2 is 'shared' and reuses th",
    ('hy_v4', 'reload'): 'needs prune',
    ('hy_v4', 'cut'): "refused: config field 'indexer_types': layer 2 is 'shared' and reuses th",
    ('hy_v4', 'cut in-place'): "refused: config field 'indexer_types': layer 2 is 'shared' and reuses th",
    ('hy_v4', 'generate'): 'needs prune',
    ('inkling2_loop_text', "build"): 'untested: 6.5 M parameters even when shrunk (limit 3 M)',
    ('inkling2_text', "build"): 'untested: 6.5 M parameters even when shrunk (limit 3 M)',
    ('jamba', 'prune'): 'refused: jamba: after removal the expert layers (old indices [3, 5]) are',
    ('jamba', 'reload'): 'needs prune',
    ('jamba', 'cut'): 'refused: jamba: after removal the expert layers (old indices [3, 5]) are',
    ('jamba', 'cut in-place'): 'refused: jamba: after removal the expert layers (old indices [3, 5]) are',
    ('jamba', 'generate'): 'needs prune',
    ('lfm3', 'prune'): 'refused: outside the layers, the pruned model would change: model.rotary',
    ('lfm3', 'reload'): 'needs prune',
    ('lfm3', 'cut'): 'refused: outside the layers, the pruned model would change: model.rotary',
    ('lfm3', 'cut in-place'): 'refused: outside the layers, the pruned model would change: model.rotary',
    ('lfm3', 'generate'): 'needs prune',
    ('marian', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('marian', 'reload'): 'needs prune',
    ('marian', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('marian', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('marian', 'generate'): 'needs prune',
    ('mbart', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('mbart', 'reload'): 'needs prune',
    ('mbart', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('mbart', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('mbart', 'generate'): 'needs prune',
    ('minicpm3', 'prune'): 'refused: layer 0 (new index 0) would change: <root>.residual_scale chang',
    ('minicpm3', 'reload'): 'needs prune',
    ('minicpm3', 'cut'): 'refused: layer 0 (new index 0) would change: <root>.residual_scale chang',
    ('minicpm3', 'cut in-place'): 'refused: layer 0 (new index 0) would change: <root>.residual_scale chang',
    ('minicpm3', 'generate'): 'needs prune',
    ('musicgen', "build"): "untested: model: AttributeError: 'MusicgenConfig' object has no attribut",
    ('musicgen_melody', "build"): "untested: model: AttributeError: 'MusicgenMelodyConfig' object has no at",
    ('mvp', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('mvp', 'reload'): 'needs prune',
    ('mvp', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('mvp', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('mvp', 'generate'): 'needs prune',
    ('nemotron_h', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('nemotron_h', 'reload'): 'needs prune',
    ('nemotron_h', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('nemotron_h', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('nemotron_h', 'generate'): 'needs prune',
    ('pegasus', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('pegasus', 'reload'): 'needs prune',
    ('pegasus', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('pegasus', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('pegasus', 'generate'): 'needs prune',
    ('phi4_multimodal', "build"): 'untested: 6.2 M parameters even when shrunk (limit 3 M)',
    ('plbart', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('plbart', 'reload'): 'needs prune',
    ('plbart', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('plbart', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('plbart', 'generate'): 'needs prune',
    ('prophetnet', 'score'): "refused: layer 0's hidden state has shape [3, 39, 32], which is not one",
    ('prophetnet', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('prophetnet', 'reload'): 'needs prune',
    ('prophetnet', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('prophetnet', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('prophetnet', 'generate'): 'needs prune',
    ('qwen4_exp', "build"): "untested: model: TypeError: unsupported operand type(s) for //: 'NoneTyp",
    ('qwen4_exp_text', "build"): "untested: model: TypeError: unsupported operand type(s) for //: 'NoneTyp",
    ('recurrent_gemma', 'prune'): 'refused: layer 2 (new index 1) would change: temporal_block :class chang',
    ('recurrent_gemma', 'reload'): 'needs prune',
    ('recurrent_gemma', 'cut'): 'refused: layer 2 (new index 1) would change: temporal_block :class chang',
    ('recurrent_gemma', 'cut in-place'): 'refused: layer 2 (new index 1) would change: temporal_block :class chang',
    ('recurrent_gemma', 'generate'): 'needs prune',
    ('reformer', "build"): 'untested: model: ValueError: Make sure that config.axial_pos_embds facto',
    ('trocr', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('trocr', 'reload'): 'needs prune',
    ('trocr', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('trocr', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('trocr', 'generate'): 'needs prune',
    ('whisper', 'prune'): "refused: config has none of ('num_hidden_layers', 'n_layer', 'num_layers",
    ('whisper', 'reload'): 'needs prune',
    ('whisper', 'cut'): 'refused: original/config.json: no layer count (num_hidden_layers, n_laye',
    ('whisper', 'cut in-place'): 'refused: cut-in-place/config.json: no layer count (num_hidden_layers, n_',
    ('whisper', 'generate'): 'needs prune',
    ('xlm', 'prune'): 'refused: outside the layers, the pruned model would change: transformer.',
    ('xlm', 'reload'): 'needs prune',
    ('xlm', 'cut'): 'refused: cannot tell which tensors belong to the 6 layers: prefixes with',
    ('xlm', 'cut in-place'): 'refused: cannot tell which tensors belong to the 6 layers: prefixes with',
    ('xlm', 'generate'): 'needs prune',
    ('xlstm', 'prune'): 'refused: the pruned config builds 6 layers, expected 4 (6 minus 2 remove',
    ('xlstm', 'reload'): 'needs prune',
    ('xlstm', 'cut'): 'refused: the pruned config builds 6 layers, expected 4 (6 minus 2 remove',
    ('xlstm', 'cut in-place'): 'refused: the pruned config builds 6 layers, expected 4 (6 minus 2 remove',
    ('xlstm', 'generate'): 'needs prune',
    ('zamba', "build"): 'untested: forward: RuntimeError: The size of tensor a (32) must match th',
    ('zaya', 'prune'): 'refused: zaya: layer 2 routes with the router state of the layer before ',
    ('zaya', 'reload'): 'needs prune',
    ('zaya', 'cut'): 'refused: zaya: layer 2 routes with the router state of the layer before ',
    ('zaya', 'cut in-place'): 'refused: zaya: layer 2 routes with the router state of the layer before ',
    ('zaya', 'generate'): 'needs prune',
}


def _expected_cells(name: str) -> dict[str, str]:
    return {step: text for (row, step), text in EXPECTED.items() if row == name}


def test_every_causal_lm_type_has_a_row():
    rows = support_matrix.rows()
    assert set(support_matrix.causal_lm_types()) <= {r.model_type for r in rows.values()}
    # The older config forms still found on the hub stay in the matrix as their own rows.
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
    _skip_unless_readme_measured_with_installed_transformers()
    in_readme = support_matrix.readme_rows(README.read_text()).get(name)
    assert in_readme == support_matrix.format_row(result), (
        "README's architecture table is stale for this row; regenerate it with "
        "`shortgpt-fast archs --write-readme README.md`")


def _skip_unless_readme_measured_with_installed_transformers() -> None:
    """The README records the matrix of one transformers release (the one `.[test]` pins); each release adds model
    types and rewords errors, so under another one only the correctness of each row is checked, not the record."""
    import transformers

    first = support_matrix.readme_table(README.read_text()).splitlines()[0]
    assert first.startswith("Measured with transformers "), first
    recorded = first.split()[3].rstrip(",")
    if recorded != transformers.__version__:
        pytest.skip(f"README's table was measured with transformers {recorded}, {transformers.__version__} is installed")


def test_readme_table_has_exactly_the_matrix_rows_in_order():
    _skip_unless_readme_measured_with_installed_transformers()
    table = support_matrix.readme_table(README.read_text())
    lines = table.splitlines()
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
    from shortgpt_fast.experiments import tiny_configs

    monkeypatch.setitem(tiny_configs.OVERRIDES, "cohere", {"hidden_act": "no_such_activation"})
    result = support_matrix.run_model_type("cohere")
    assert result.outcome == "untested"
    assert result.untested.startswith("untested: model: KeyError"), result.untested
    assert result.row()[1] == result.untested and result.row()[2:] == [""] * len(STEPS)
