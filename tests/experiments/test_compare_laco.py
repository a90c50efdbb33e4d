"""`compare` with LaCo beside BI: the same number of layers goes, and the LaCo row is the collapsed model's."""
from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_llama

from shortgpt_fast import api
from shortgpt_fast.data.calibration import CalibrationSet
from shortgpt_fast.evaluation.perplexity import perplexity
from shortgpt_fast.experiments import compare as cmp
from shortgpt_fast.surgery import laco


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(num_layers=6)
    ids = random_ids(4, 17)
    calib = CalibrationSet(ids, torch.ones_like(ids), {"source": "random ids"})
    return model, calib


def test_laco_row_removes_as_many_layers_as_bi_and_is_the_collapsed_model(setup, tmp_path):
    model, calib = setup
    scores = api.score(model, calib.input_ids, attention_mask=calib.attention_mask, progress=False)
    text = tmp_path / "ids.txt"
    text.write_text(" ".join(map(str, random_ids(1, 200, seed=3)[0].tolist())))

    class Tok:  # the tiny model's vocabulary is ids; perplexity text is read as numbers
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

    eval_kwargs = dict(ppl=str(text), ppl_tokens=120, ppl_window=64, ppl_stride=32, tasks=[], data_dir=None)
    table = cmp.compare(model, Tok(), scores, ratios=[0.5], methods=["bi", "laco"], eval_kwargs=eval_kwargs,
                        laco_calibration=calib, laco_kwargs={"merge_layers": 3}, log=lambda *_: None)
    rows = {r["method"]: r for r in table["rows"]}
    assert len(rows["bi"]["removed"]) == len(rows["laco"]["removed"]) == 3
    plan = laco.search(model, calib.input_ids, attention_mask=calib.attention_mask, remove=3, merge_layers=3)
    assert rows["laco"]["removed"] == plan.removed and rows["laco"]["laco"]["removed"] == plan.removed
    ids = torch.tensor(Tok()(text.read_text())["input_ids"][:120])
    expected = perplexity(laco.collapse_model(model, plan), ids, window=64, stride=32)["ppl"]
    assert rows["laco"]["ppl"] == pytest.approx(expected, rel=1e-12)
    assert rows["laco"]["params_kept_pct"] == pytest.approx(rows["bi"]["params_kept_pct"])


def test_laco_needs_calibration_and_is_a_known_method(setup):
    model, calib = setup
    assert cmp.parse_methods("bi,laco") == ["bi", "laco"]
    with pytest.raises(ValueError, match="laco needs calibration"):
        cmp.compare(model, None, None, ratios=[0.5], methods=["laco"], eval_kwargs={})
