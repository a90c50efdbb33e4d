"""Streamed (block-at-a-time) scoring equals in-memory scoring, stays within its memory bound, and reports damage."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_MODELS, VOCAB, random_ids
from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig, RwkvConfig

from shortgpt_fast import api
from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.experiments import support_matrix
from shortgpt_fast.io.safetensors import read_header
from shortgpt_fast.scoring import streamed
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.report import SCORE_METRICS
from shortgpt_fast.scoring.streamed import StreamingError, collect_layer_stats_streamed

REPO = Path(__file__).resolve().parents[2]


def tiny_mistral(num_layers: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=120, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=6, tie_word_embeddings=False, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gemma2(num_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          sliding_window=6, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def matrix_model(name: str):
    return lambda: support_matrix.build_model(support_matrix.FAMILIES[name])


# Falcon and RWKV blocks return tuples the model's forward indexes or unpacks; Mixtral, Qwen3-MoE and DeepSeek-V3
# store one tensor per expert that transformers fuses on load (Qwen3-MoE and DeepSeek-V3 mix dense and MoE layers).
FAMILIES = dict(TINY_MODELS, mistral=tiny_mistral, gemma2=tiny_gemma2,
                **{name: matrix_model(name) for name in ("falcon", "rwkv", "mixtral", "qwen3_moe", "deepseek_v3")})


def save_sharded(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="60KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2, "the checkpoint must span several shards to exercise the shard map"
    return folder


def padded_calibration(samples: int = 5, seq_len: int = 19):
    # Longer than the sliding windows (6, 8), with left and right padding, so masks and positions both matter.
    ids = random_ids(samples, seq_len, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[3, 14:] = 0
    return from_tensors(ids, mask)


def assert_same_stats(expected, got):
    # Both paths run the same kernels on the same shapes, so agreement is expected to the last bit; 1e-7 relative
    # is below one float32 ulp of any summand, far tighter than the 1e-3 scale of a wrong mask or a wrong position.
    assert torch.equal(expected.per_sequence[:, :, 0], got.per_sequence[:, :, 0]), "token counts differ"
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-7, atol=1e-12)
    assert sorted(got.span_angular) == sorted(expected.span_angular)
    for n, values in expected.span_angular.items():
        torch.testing.assert_close(got.span_angular[n], values, rtol=1e-7, atol=1e-12)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    folder = save_sharded(FAMILIES[family](), tmp_path_factory.mktemp(family))
    return family, folder


def test_streamed_equals_in_memory(checkpoint):
    family, folder = checkpoint
    calib = padded_calibration()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = collect_layer_stats(loaded, calib, batch_size=2, angular_span=3, progress=False)
    got = collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=3, progress=False)
    assert got.block_path == expected.block_path
    assert got.streaming["activations"] == "device"
    assert_same_stats(expected, got)


def test_streamed_rankings_identical_through_api(checkpoint):
    family, folder = checkpoint
    calib = padded_calibration()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    in_memory = api.score(loaded, calib, batch_size=3, angular_span=2, progress=False)
    stream = api.score(str(folder), calib, batch_size=3, angular_span=2, progress=False, streamed=True)
    assert stream.calibration["streamed"] is True
    for metric in SCORE_METRICS:
        assert stream.ranking(metric) == in_memory.ranking(metric), metric
    assert stream.select("angular_span", 2) == in_memory.select("angular_span", 2)
    torch.testing.assert_close(torch.as_tensor(stream.bi_ci95()), torch.as_tensor(in_memory.bi_ci95()),
                               rtol=1e-7, atol=1e-12)


def test_falcon_tuple_blocks_stream_like_in_memory(tmp_path):
    model = FAMILIES["falcon"]()
    calib = padded_calibration()
    outputs = []
    handle = model.transformer.h[0].register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model(calib.input_ids[:1])
    handle.remove()
    assert isinstance(outputs[0], tuple), "the premise: Falcon's blocks return a tuple, not the hidden state"
    folder = save_sharded(model, tmp_path / "falcon")
    expected = collect_layer_stats(model, calib, batch_size=2, angular_span=3, progress=False)
    got = collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=3, progress=False)
    assert_same_stats(expected, got)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_experts_fused_on_load_stream_like_in_memory(family, tmp_path):
    folder = save_sharded(FAMILIES[family](), tmp_path / family)
    stored = [t[0] for shard in folder.glob("*.safetensors") for t in read_header(shard)["tensors"]]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    # The premise: the checkpoint keeps one tensor per expert, the loaded model one fused tensor per layer.
    assert any(".experts.0." in name for name in stored) and not any("gate_up_proj" in name for name in stored)
    assert any(name.endswith("experts.gate_up_proj") for name, _ in loaded.named_parameters())
    calib = padded_calibration()
    expected = collect_layer_stats(loaded, calib, batch_size=2, angular_span=3, progress=False)
    got = collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=3, progress=False)
    assert_same_stats(expected, got)
    in_memory = api.score(loaded, calib, batch_size=2, angular_span=3, progress=False)
    stream = api.score(str(folder), calib, batch_size=2, angular_span=3, progress=False, streamed=True)
    for metric in SCORE_METRICS:
        assert stream.ranking(metric) == in_memory.ranking(metric), metric


def test_moe_checkpoint_missing_an_expert_names_the_fused_tensor(tmp_path):
    folder = save_sharded(FAMILIES["mixtral"](), tmp_path / "mixtral")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {name: shard for name, shard in index["weight_map"].items()
                           if not name.startswith("model.layers.2.block_sparse_moe.experts.1.")}
    index_path.write_text(json.dumps(index))
    with pytest.raises(StreamingError, match=r"model\.layers\.2\.mlp\.experts\.gate_up_proj the shape \(2, .*"
                                             r"expects \(3, .*re-download or re-save it"):
        collect_layer_stats_streamed(str(folder), padded_calibration(), progress=False)


def test_hidden_state_changed_between_blocks_is_refused(tmp_path):
    # RWKV with rescale_every halves the hidden state between blocks, outside any block, so replaying blocks on
    # each other's outputs would score inputs the model never sees.
    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=VOCAB, hidden_size=40, attention_hidden_size=40, intermediate_size=72,
                        num_hidden_layers=4, context_length=128, rescale_every=2, pad_token_id=0)
    folder = save_sharded(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "rwkv")
    with pytest.raises(StreamingError, match="changes the hidden state between blocks 1 and 2.*drop --streamed"):
        collect_layer_stats_streamed(str(folder), padded_calibration(), progress=False)


def test_bfloat16_streamed_equals_in_memory(tmp_path):
    folder = save_sharded(FAMILIES["llama"](), tmp_path / "llama")
    calib = padded_calibration()
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    expected = collect_layer_stats(loaded, calib, batch_size=2, angular_span=2, progress=False)
    got = collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=2, dtype="bfloat16",
                                       progress=False)
    assert_same_stats(expected, got)


def test_activations_spill_to_disk_and_say_so(tmp_path, capsys):
    folder = save_sharded(FAMILIES["qwen3"](), tmp_path / "qwen3")
    calib = padded_calibration()
    on_device = collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=2, progress=False)
    spilled = collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=2, progress=False,
                                           activation_budget=0)
    assert spilled.streaming["activations"] == "disk"
    assert "spilling them to a temporary file" in capsys.readouterr().err
    assert_same_stats(on_device, spilled)


def test_streaming_is_chosen_when_the_model_does_not_fit(tmp_path, capsys, monkeypatch):
    folder = save_sharded(FAMILIES["llama"](), tmp_path / "llama")
    monkeypatch.setattr(streamed, "available_memory_bytes", lambda device: 10_000)
    scores = api.score(str(folder), random_ids(2, 9), progress=False)
    assert scores.calibration.get("streamed") is True
    err = capsys.readouterr().err
    assert "GB free on cpu: scoring streamed" in err and "model needs about" in err


def test_in_memory_when_the_model_fits(tmp_path):
    folder = save_sharded(FAMILIES["llama"](), tmp_path / "llama")
    stream, estimate = streamed.streaming_decision(str(folder), "float32", "cpu")
    assert not stream and "loading it whole" in estimate


def _largest_layer_tensor(folder: Path):
    """(shard, tensor name, header entry) of the biggest layer tensor, so damage in it is read by a block load."""
    best = None
    for shard in sorted(folder.glob("*.safetensors")):
        header = read_header(shard)
        for name, _dtype, _shape, begin, end in header["tensors"]:
            if ".layers." not in name:
                continue
            if best is None or end - begin > best[3] - best[2]:
                best = (shard, name, begin + header["data_start"], end + header["data_start"])
    return best


def test_corrupted_shard_names_shard_and_tensor(tmp_path):
    folder = save_sharded(FAMILIES["llama"](), tmp_path / "llama")
    shard, name, begin, end = _largest_layer_tensor(folder)
    with open(shard, "r+b") as fh:
        fh.seek((begin + end) // 2 // 4 * 4)
        fh.write(b"\xff" * 64)  # float32 NaNs in the middle of the tensor
    with pytest.raises(StreamingError) as err:
        collect_layer_stats_streamed(str(folder), padded_calibration(), progress=False)
    assert shard.name in str(err.value) and name in str(err.value)


def test_truncated_shard_names_shard_and_tensor(tmp_path):
    folder = save_sharded(FAMILIES["llama"](), tmp_path / "llama")
    shard, name, begin, end = _largest_layer_tensor(folder)
    with open(shard, "r+b") as fh:
        fh.truncate((begin + end) // 2)
    with pytest.raises(StreamingError) as err:
        collect_layer_stats_streamed(str(folder), padded_calibration(), progress=False)
    assert shard.name in str(err.value) and name in str(err.value)


@pytest.mark.slow
def test_cli_streamed_flag(tmp_path, smollm2, capsys):
    from shortgpt_fast.cli import main

    out = tmp_path / "report.json"
    assert main(["score", "smollm2-135m", "--out", str(out), "--streamed", "--quiet", "--samples", "2",
                 "--seq-len", "32"]) == 0
    report = json.loads(out.read_text())
    assert report["calibration"]["streamed"] is True
    assert len(report["ranking"]["bi"]) == 30


@pytest.mark.slow
def test_streamed_equals_in_memory_on_smollm2(smollm2):
    model, tokenizer = smollm2
    calib = api.calibration_set(None, tokenizer, samples=2, seq_len=32, seed=5)
    expected = api.score(model, calib, batch_size=2, progress=False)
    got = api.score("smollm2-135m", calib, batch_size=2, progress=False, streamed=True)
    assert got.num_layers == expected.num_layers == 30
    assert_same_stats(expected.stats, got.stats)
    for metric in SCORE_METRICS:
        assert got.ranking(metric) == expected.ranking(metric), metric


PEAK_CHILD = textwrap.dedent("""
    import json, sys, torch
    from shortgpt_fast.data.calibration import from_tensors
    from shortgpt_fast.scoring.streamed import collect_layer_stats_streamed

    def high_water_mark():
        # VmHWM, not ru_maxrss: ru_maxrss keeps the parent's RSS at fork, which would hide this process's own peak.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    ids = torch.randint(1, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    calib = from_tensors(ids)
    # A full pass on a tiny model first, so lazy imports and kernel loading are in the baseline, not the growth.
    collect_layer_stats_streamed({tiny!r}, calib, batch_size=2, progress=False, dtype="bfloat16")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    baseline = high_water_mark()
    stats = collect_layer_stats_streamed({big!r}, calib, batch_size=2, progress=False, dtype="bfloat16")
    peak = high_water_mark()
    print(json.dumps({{"baseline": baseline, "peak": peak, "activation_bytes": stats.streaming["activation_bytes"]}}))
""")


def test_peak_rss_stays_within_a_few_blocks(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from bench_surgery import generate_checkpoint

    big = tmp_path / "big"
    total = generate_checkpoint(big, hidden=768, intermediate=2048, layers=24, vocab=4096, heads=12, kv_heads=4,
                                shard_bytes=60_000_000)
    tiny = save_sharded(FAMILIES["llama"](), tmp_path / "tiny")
    header_sizes = {}
    for shard in big.glob("*.safetensors"):
        for name, _dtype, _shape, begin, end in read_header(shard)["tensors"]:
            header_sizes[name] = end - begin
    largest_block = max(sum(v for k, v in header_sizes.items() if k.startswith(f"model.layers.{i}.")) for i in range(24))
    outside = sum(v for k, v in header_sizes.items() if ".layers." not in k and not k.startswith("lm_head"))
    child = PEAK_CHILD.format(tiny=str(tiny), big=str(big))
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    margin = 64 * 2**20  # allocator slack, the kernels' scratch, thread stacks
    bound = 3 * largest_block + outside + 4 * measured["activation_bytes"] + margin
    grown = measured["peak"] - measured["baseline"]
    assert total > 250e6 and bound < total / 2, "the bound must be well below the checkpoint, or the test proves nothing"
    assert grown <= bound, f"peak grew {grown / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB"


def test_memory_budget_and_compute_dtype_reach_streamed_scoring_and_the_report(tmp_path):
    model = tiny_mistral()
    model.save_pretrained(tmp_path / "m")
    calib = padded_calibration()
    in_memory = api.score(model, calib, batch_size=3, angular_span=2, progress=False)
    budget = 2 * 10**6
    # No streamed=True: asking for a weight budget is asking to stream.
    got = api.score(str(tmp_path / "m"), calib, batch_size=3, angular_span=2, progress=False, memory_budget=budget,
                    compute_dtype="float32")
    settings = got.calibration
    assert settings["streamed"] is True and settings["memory_budget"] == budget
    assert settings["compute_dtype"] == "float32" and settings["compute_dtype_reason"]
    assert settings["quantization"] is None and isinstance(settings["blocks_in_parts"], list)
    assert got.ranking("bi") == in_memory.ranking("bi")
    assert json.loads(json.dumps(got.to_dict()))["calibration"]["memory_budget"] == budget  # stable JSON

    with pytest.raises(ValueError, match="memory_budget applies to streamed scoring only"):
        api.score(model, calib, progress=False, memory_budget=budget)
    with pytest.raises(ValueError, match="compute_dtype applies to streamed scoring only"):
        api.score(str(tmp_path / "m"), calib, progress=False, streamed=False, compute_dtype="auto")


def test_cli_compute_dtypes_are_the_library_ones():
    from shortgpt_fast.cli.common import COMPUTE_DTYPES as cli_choices
    from shortgpt_fast.scoring.hardware import COMPUTE_DTYPES

    assert cli_choices == COMPUTE_DTYPES
