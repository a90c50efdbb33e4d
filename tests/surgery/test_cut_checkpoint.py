"""Checkpoint surgery (`shortgpt-fast cut`): real transformers architectures saved in shards, cut without loading,
then reloaded and compared with the same model pruned in memory."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config, Qwen3MoeConfig

from shortgpt_fast.cli.cut import add_parser as add_cut_parser
from shortgpt_fast.io.durable import OutputFolderError
from shortgpt_fast.surgery import cut_in_place as surgery
from shortgpt_fast.surgery.checkpoint import JOURNAL_NAME, SurgeryError, cut_checkpoint

try:
    from shortgpt_fast.surgery.in_memory import prune_model
except ImportError:  # the in-memory pruner lands separately; the reference below is the same three steps
    prune_model = None


def _tiny_config(name):
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    make = {
        "llama": lambda: LlamaConfig(num_hidden_layers=6, tie_word_embeddings=False, **common),
        "qwen3": lambda: Qwen3Config(num_hidden_layers=6, head_dim=8, use_sliding_window=True, sliding_window=3,
                             max_window_layers=6,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                          "sliding_attention", "full_attention", "full_attention"], **common),
        "gpt2": lambda: GPT2Config(vocab_size=96, n_embd=32, n_layer=5, n_head=4, n_positions=32, bos_token_id=0,
                                   eos_token_id=0),
        # decoder_sparse_step=2 makes odd layers MoE and even ones dense: removal must turn the step into an
        # explicit mlp_only_layers list or the reloaded model builds the wrong block types.
        "qwen3_moe": lambda: Qwen3MoeConfig(num_hidden_layers=5, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, decoder_sparse_step=2, **common),
    }
    return make[name]()


REMOVE = {"llama": [1, 4], "qwen3": [0, 3], "gpt2": [2], "qwen3_moe": [1, 2]}


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _save(name: str, directory: Path, shards: int) -> Path:
    torch.manual_seed(0)
    config = _tiny_config(name)
    model = AutoModelForCausalLM.from_config(config)
    if shards == 1:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=_param_bytes(model) // shards + 1)
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    return directory


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference_logits(src: Path, removed: list[int]) -> tuple[torch.Tensor, dict]:
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    if prune_model is not None:
        prune_model(model, removed)
    else:
        from shortgpt_fast.models.architectures import find_block_stack, renumber_block_indices
        from shortgpt_fast.models.config_surgery import apply_to_config

        stack = find_block_stack(model)
        for i in sorted(removed, reverse=True):
            del stack.blocks[i]
        renumber_block_indices(stack.blocks)
        apply_to_config(model.config, removed)
    return _logits(model), model.config.to_dict()


def _load_checked(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name,shards", [("llama", 3), ("qwen3", 2), ("gpt2", 4), ("qwen3_moe", 3), ("llama", 1)])
def test_cut_matches_in_memory_pruning(tmp_path, name, shards):
    src = _save(name, tmp_path / "src", shards)
    n_files = len(list(src.glob("*.safetensors")))
    assert (n_files == 1) if shards == 1 else (2 <= n_files <= 4), f"fixture has {n_files} shards"
    before = _tree(src)
    removed = REMOVE[name]

    copy = cut_checkpoint(src, removed, out=tmp_path / "copy", verify=True)
    assert _tree(src) == before, "copy mode modified the source"
    in_place_dir = tmp_path / "inplace"
    shutil.copytree(src, in_place_dir)
    in_place = cut_checkpoint(in_place_dir, ",".join(map(str, removed)), in_place=True, verify=True)

    assert copy.removed == in_place.removed == removed
    assert _tree(tmp_path / "copy") == _tree(in_place_dir), "copy and in-place results differ"
    assert not (in_place_dir / JOURNAL_NAME).exists()

    expected, expected_config = _reference_logits(src, removed)
    loaded = _load_checked(tmp_path / "copy")
    assert torch.equal(_logits(loaded), expected)
    for key in ("layer_types", "mlp_only_layers", "decoder_sparse_step", "max_window_layers", "num_hidden_layers",
                "n_layer"):
        assert loaded.config.to_dict().get(key) == expected_config.get(key), key
    assert "tokenizer.json" in _tree(tmp_path / "copy") and "chat_template.jinja" in _tree(tmp_path / "copy")
    assert f"original indices): {', '.join(map(str, removed))};" in (tmp_path / "copy" / "README.md").read_text()
    if shards > 1:
        index = json.loads((tmp_path / "copy" / "model.safetensors.index.json").read_text())
        shard_files = sorted((tmp_path / "copy").glob("*.safetensors"))
        assert index["metadata"]["total_size"] == sum(
            os.path.getsize(f) - 8 - struct.unpack("<Q", f.read_bytes()[:8])[0] for f in shard_files)
        k = len(shard_files)
        assert [f.name for f in shard_files] == [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]


# ------------------------------------------------------------------------------------------------------------------
# A hand-sharded Llama whose layout exercises every shard kind: one shard keeps its data and only renames (header),
# one loses a tensor group (compact), one loses everything (drop), and the count of shards changes (all renamed).

def _hand_sharded_llama(directory: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=5, tie_word_embeddings=False))
    model.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    os.unlink(directory / "model.safetensors")
    groups = [lambda n: "embed" in n or ".layers.0." in n,
              lambda n: ".layers.1." in n or ".layers.2." in n,
              lambda n: ".layers.3." in n,
              lambda n: ".layers.4." in n or n in ("model.norm.weight", "lm_head.weight")]
    weight_map = {}
    for i, belongs in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-00004.safetensors"
        part = {k: v for k, v in state.items() if belongs(k)}
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    assert set(weight_map) == set(state)
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory


@pytest.fixture
def hand_sharded(tmp_path):
    src = _hand_sharded_llama(tmp_path / "src")
    golden = tmp_path / "golden"
    cut_checkpoint(src, [1, 3], out=golden)
    return src, golden


class InjectedCrash(RuntimeError):
    pass


def test_hand_sharded_layout_covers_every_shard_kind(hand_sharded):
    src, golden = hand_sharded
    kinds = sorted(s.kind for s in surgery.build_plan(src, [1, 3]).shards)
    assert kinds == ["compact", "drop", "header", "header"]
    assert sorted(p.name for p in golden.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    expected, _ = _reference_logits(src, [1, 3])
    assert torch.equal(_logits(_load_checked(golden)), expected)


def test_in_place_crash_at_every_step_then_rerun_completes(hand_sharded, tmp_path, monkeypatch):
    src, golden = hand_sharded
    steps = []
    monkeypatch.setattr(surgery, "after_step_hook", lambda k, what: steps.append(what))
    cut_checkpoint(shutil.copytree(src, tmp_path / "count"), [1, 3], in_place=True)
    assert len(steps) >= 6, steps

    for crash_after in range(len(steps)):
        work = shutil.copytree(src, tmp_path / f"crash{crash_after}")

        def crash(k, what, crash_after=crash_after):
            if k == crash_after:
                raise InjectedCrash(what)

        monkeypatch.setattr(surgery, "after_step_hook", crash)
        with pytest.raises(InjectedCrash):
            cut_checkpoint(work, [1, 3], in_place=True, verify=True)
        if steps[crash_after] == "journal retired":
            # The cut is complete; the rerun must find it recorded in config.json instead of cutting again.
            assert not (work / JOURNAL_NAME).exists()
            monkeypatch.setattr(surgery, "after_step_hook", None)
            assert cut_checkpoint(work, [1, 3], in_place=True, verify=True).already_done
            assert _tree(work) == _tree(golden)
            continue
        assert (work / JOURNAL_NAME).exists()
        monkeypatch.setattr(surgery, "after_step_hook", None)
        with pytest.raises(SurgeryError, match="interrupted"):
            cut_checkpoint(work, [1, 3], out=tmp_path / f"refused{crash_after}")
        with pytest.raises(SurgeryError, match="--layers 1,3 --in-place"):
            cut_checkpoint(work, [2], in_place=True)
        result = cut_checkpoint(work, [1, 3], in_place=True, verify=True)
        assert result.resumed
        assert _tree(work) == _tree(golden), f"crash after step {crash_after} ({steps[crash_after]}) lost data"


def test_in_place_torn_header_write_is_repaired(hand_sharded, tmp_path, monkeypatch):
    src, golden = hand_sharded
    work = shutil.copytree(src, tmp_path / "work")
    plan = surgery.build_plan(work, [1, 3])
    header_shard = next(s for s in plan.shards if s.kind == "header" and s.header.encode() != (
        work / s.source).read_bytes()[8:8 + s.old_header_len])

    def tear(k, what):
        if k == 0:  # journal durable, nothing else touched: tear one header write halfway
            new = struct.pack("<Q", header_shard.old_header_len) + header_shard.header.encode()
            with open(work / header_shard.source, "r+b") as f:
                f.write(new[: len(new) // 2])
            raise InjectedCrash("torn")

    monkeypatch.setattr(surgery, "after_step_hook", tear)
    with pytest.raises(InjectedCrash):
        cut_checkpoint(work, [1, 3], in_place=True)
    monkeypatch.setattr(surgery, "after_step_hook", None)
    cut_checkpoint(work, [1, 3], in_place=True)
    assert _tree(work) == _tree(golden)


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from shortgpt_fast.surgery.checkpoint import cut_checkpoint
    cut_checkpoint(sys.argv[1], [1, 3], in_place=True)
""")


@pytest.mark.parametrize("env", [{"SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES": "1"},
                                 {"SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES": "2"},
                                 {"SHORTGPT_FAST_CUT_KILL_AFTER_STEP": "3"}])
def test_sigkill_mid_surgery_then_rerun_completes(hand_sharded, tmp_path, env):
    src, golden = hand_sharded
    work = shutil.copytree(src, tmp_path / "work")
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(work)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, f"surgery was not killed: rc={proc.returncode} {proc.stderr[-500:]}"
    assert (work / JOURNAL_NAME).exists()
    cut_checkpoint(work, [1, 3], in_place=True)
    assert _tree(work) == _tree(golden)


def test_verify_detects_a_corrupted_result(hand_sharded, tmp_path, monkeypatch):
    src, _ = hand_sharded
    work = shutil.copytree(src, tmp_path / "work")

    def flip_last_byte(k, what):
        if k == 1:
            target = next(p for p in sorted(work.glob("model-*-of-00003.safetensors")))
            with open(target, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                byte = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0xFF]))

    monkeypatch.setattr(surgery, "after_step_hook", flip_last_byte)
    with pytest.raises(SurgeryError, match="differs from the source bytes"):
        cut_checkpoint(work, [1, 3], in_place=True, verify=True)


def test_copy_mode_fallback_read_write_loop_is_identical(hand_sharded, tmp_path):
    src, golden = hand_sharded
    result = cut_checkpoint(src, [1, 3], out=tmp_path / "rw", copy_method="readwrite")
    assert result.copy_method == "readwrite"
    assert _tree(tmp_path / "rw") == _tree(golden)


# ------------------------------------------------------------------------------------------------------------------
# Malformed inputs: each one is refused with a one-line message, leaves the source as it was and writes nothing.

def _raw_safetensors(path: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _layer_tensors(layers=2):
    header, offset = {}, 0
    for name in ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.weight" for i in range(layers)]:
        header[name] = _entry(offsets=(offset, offset + 8))
        offset += 8
    return header, b"\x01" * offset


def _checkpoint_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return d


def _single(header: dict | bytes, data: bytes, length: int | None = None):
    def make(d: Path):
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        _raw_safetensors(d / "model.safetensors", raw, data, length)
    return make


def _with(mutate):
    def make(d: Path):
        header, data = _layer_tensors()
        header, data, length = mutate(header, data)
        _single(header, data, length)(d)
    return make


def _sharded(weight_map_edit=None, extra=None):
    def make(d: Path):
        header, data = _layer_tensors()
        _raw_safetensors(d / "model-00001-of-00001.safetensors", json.dumps(header).encode(), data)
        weight_map = {k: "model-00001-of-00001.safetensors" for k in header}
        if weight_map_edit:
            weight_map_edit(weight_map)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        if extra:
            extra(d)
    return make


def _symlinked_shard(d: Path):
    header, data = _layer_tensors()
    outside = d.parent / "elsewhere.safetensors"
    _raw_safetensors(outside, json.dumps(header).encode(), data)
    os.symlink(outside, d / "model.safetensors")


MALFORMED = {
    "truncated file": (_with(lambda h, d: (h, d[:-3], None)), "truncated"),
    "file shorter than 8 bytes": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"), "too short"),
    "header length beyond file": (_with(lambda h, d: (h, d, 10_000)), "runs past the end"),
    "header length over 100 MB": (_with(lambda h, d: (h, d, 200_000_000)), "100 MB"),
    "bad JSON": (_single(b'{"model.layers.0.w": {"dtype": "F32",', b""), "invalid JSON"),
    "non-UTF-8 header": (_single(b'{"\xff\xfe": 1}', b""), "UTF-8"),
    "header is a list": (_single(b"[1, 2]", b""), "not a JSON object"),
    "duplicate names": (_single(
        b'{"model.layers.0.w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"model.layers.0.w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', b"\0" * 16), "duplicate"),
    "overlapping offsets": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": _entry(offsets=(4, 12))},
                                                d[:-4], None)), "overlaps"),
    "hole between tensors": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": _entry(offsets=(20, 28))},
                                                 d + b"\0" * 4, None)), "hole"),
    "offsets out of bounds": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": _entry(offsets=(16, 800))},
                                                  d, None)), "data section"),
    "wrong byte size": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": _entry(shape=(3,), offsets=(16, 24))},
                                            d, None)), "needs 12 bytes"),
    "unknown dtype": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": _entry(dtype="F17",
                                                                                    offsets=(16, 24))}, d, None)),
                      "unknown dtype"),
    "negative offset": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": _entry(offsets=(-8, 24))}, d, None)),
                        "non-negative"),
    "trailing bytes": (_with(lambda h, d: (h, d + b"\0" * 8, None)), "trailing bytes"),
    "unknown tensor field": (_with(lambda h, d: ({**h, "model.layers.1.mlp.weight": {**_entry(offsets=(16, 24)),
                                                                                      "x": 1}}, d, None)),
                             "unexpected"),
    "metadata not strings": (_with(lambda h, d: ({"__metadata__": {"a": 1}, **h}, d, None)), "not a string"),
    "deep nesting": (_single(b"[" * 10_000 + b"]" * 10_000, b""), "nesting"),
    "index names a missing shard": (_sharded(lambda wm: wm.update({"model.layers.1.mlp.weight": "gone.safetensors"})),
                                    "does not exist"),
    "index points outside the folder": (_sharded(lambda wm: wm.update({"model.layers.1.mlp.weight":
                                                                       "../x.safetensors"})), "not a plain file"),
    "index gives an absolute path": (_sharded(lambda wm: wm.update({"model.layers.1.mlp.weight":
                                                                    "/etc/passwd"})), "not a plain file"),
    "index disagrees with headers": (_sharded(lambda wm: wm.pop("model.layers.1.mlp.weight")), "disagrees"),
    "index lists a tensor no shard holds": (_sharded(lambda wm: wm.update({"extra.w":
                                                                           "model-00001-of-00001.safetensors"})),
                                            "no shard holds"),
    "symlink outside the folder": (_symlinked_shard, "outside"),
    "no safetensors at all": (lambda d: None, "neither"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("mode", ["copy", "in_place"])
def test_malformed_checkpoint_is_refused_cleanly(tmp_path, case, mode):
    make, message = MALFORMED[case]
    src = _checkpoint_dir(tmp_path)
    make(src)
    before = _tree(src)
    out = tmp_path / "out"
    kwargs = {"out": out} if mode == "copy" else {"in_place": True}
    with pytest.raises(SurgeryError, match=message) as err:
        cut_checkpoint(src, [1], **kwargs)
    assert "\n" not in str(err.value)
    assert str(src) in str(err.value) or "bad" in str(err.value)
    assert _tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad"] + (["elsewhere.safetensors"]
                                                                          if case.startswith("symlink") else []))


@pytest.mark.parametrize("layers,message", [("5", "out of range"), ("0,1", "at least one layer must remain"),
                                            ("1,1", "repeat"), ("a,b", "not a list of layer indices")])
def test_bad_layer_requests_are_refused(tmp_path, layers, message):
    src = _checkpoint_dir(tmp_path)
    _with(lambda h, d: (h, d, None))(src)
    with pytest.raises(SurgeryError, match=message):
        cut_checkpoint(src, layers, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_dir_must_be_new_or_empty(hand_sharded, tmp_path):
    src, _ = hand_sharded
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="already exists and is not empty"):
        cut_checkpoint(src, [1], out=busy)
    assert (busy / "keep.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    cut_checkpoint(src, [1], out=tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").exists()
    with pytest.raises(SurgeryError, match="exactly one"):
        cut_checkpoint(src, [1])


def test_in_place_refuses_hard_linked_shards(hand_sharded, tmp_path):
    src, _ = hand_sharded
    work = shutil.copytree(src, tmp_path / "work")
    os.link(work / "model-00004-of-00004.safetensors", tmp_path / "other-name.safetensors")
    before = _tree(work)
    with pytest.raises(SurgeryError, match="hard links"):
        cut_checkpoint(work, [1, 3], in_place=True)
    assert _tree(work) == before


def test_cli_subcommand(hand_sharded, tmp_path, capsys):
    src, golden = hand_sharded
    parser = argparse.ArgumentParser()
    add_cut_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cut", str(src), "--layers", "1,3", "--out", str(tmp_path / "cli"), "--verify"])
    assert args.func(args) == 0
    assert "removed layers [1, 3]" in capsys.readouterr().out
    assert _tree(tmp_path / "cli") == _tree(golden)
    with pytest.raises(SystemExit):
        parser.parse_args(["cut", str(src), "--layers", "1", "--out", "x", "--in-place"])


# ------------------------------------------------------------------------------------------------------------------
# Memory: a few hundred MB checkpoint is cut by a process whose peak RSS grows by a small, size-independent amount.

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from shortgpt_fast.surgery.checkpoint import cut_checkpoint

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss_kb("VmRSS")
    cut_checkpoint(sys.argv[1], [1, 5], out=sys.argv[2], copy_method=sys.argv[4])
    cut_checkpoint(sys.argv[3], [1, 5], in_place=True, copy_method=sys.argv[4])
    print(json.dumps({"base_kb": base, "peak_kb": rss_kb("VmHWM")}))
""")


def _write_big_checkpoint(directory: Path, layers: int, layer_bytes: int, shards: int) -> int:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.down_proj.weight" for i in range(layers)]
    per_shard = -(-len(names) // shards)
    weight_map, total, block = {}, 0, 1 << 20
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        group = names[s * per_shard:(s + 1) * per_shard]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in group:
            header[name] = {"dtype": "BF16", "shape": [layer_bytes // 2 // 1024, 1024],
                            "data_offsets": [offset, offset + layer_bytes]}
            offset += layer_bytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / shard, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i, name in enumerate(group):
                chunk = bytes([(s * 31 + i) % 251]) * block
                for _ in range(layer_bytes // block):
                    f.write(chunk)
                weight_map[name] = shard
        total += offset
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return total


@pytest.mark.parametrize("copy_method", ["auto", "readwrite"])
def test_peak_memory_is_bounded_by_buffer_not_checkpoint(tmp_path, copy_method):
    size = _write_big_checkpoint(tmp_path / "big", layers=8, layer_bytes=32 << 20, shards=3)
    assert size > 250e6
    shutil.copytree(tmp_path / "big", tmp_path / "big_in_place")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "big"), str(tmp_path / "out"),
                           str(tmp_path / "big_in_place"), copy_method], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mb = (mem["peak_kb"] - mem["base_kb"]) / 1024
    assert growth_mb < 40, f"peak RSS grew by {growth_mb:.0f} MB while cutting a {size / 1e6:.0f} MB checkpoint"
    assert _tree(tmp_path / "out") == _tree(tmp_path / "big_in_place")
