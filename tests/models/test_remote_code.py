"""trust_remote_code: a Baichuan-style folder (its own configuration/modeling files, an auto_map, its own name for
the layer count) is refused without the flag, and with it scored, pruned in memory (proven), saved and reloaded to
the logits of the identity oracle."""
from __future__ import annotations

import json

import pytest
import torch
from remote_code_model import write_remote_code_model
from tiny_models import random_ids

from shortgpt_fast import api
from shortgpt_fast.models.identity_oracle import identity_logits
from shortgpt_fast.models.loading import ModelLoadError, RemoteCodeWarning


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory, tokenizer):
    return write_remote_code_model(tmp_path_factory.mktemp("remote") / "tiny-baichuan", tokenizer)


def test_remote_code_is_refused_without_the_flag(remote_folder):
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        api.score(str(remote_folder), random_ids(2, 9), progress=False, streamed=False)


def test_scored_pruned_saved_and_reloaded(remote_folder, tmp_path):
    with pytest.warns(RemoteCodeWarning, match="runs the Python code"):
        model, tok = api.load(str(remote_folder), trust_remote_code=True)
    ids = random_ids(4, 17, seed=6)
    scores = api.score(model, ids, batch_size=2, progress=False)
    assert scores.num_layers == 5 and scores.stats.block_path == "model.layers"
    removed = scores.select("bi", 2)
    want = identity_logits(model, removed, ids)
    api.prune(model, removed)  # proven against the remote classes, which the trusted load registered
    assert model.config.num_hidden_layers == 3 and model.config.n_blocks == 3
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["n_blocks"] == 3 and "num_hidden_layers" not in saved
    assert (out / "modeling_tiny_baichuan.py").exists()
    with pytest.warns(RemoteCodeWarning):
        reloaded, _ = api.load(str(out), trust_remote_code=True)
    assert len(reloaded.model.layers) == 3
    torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=0)
