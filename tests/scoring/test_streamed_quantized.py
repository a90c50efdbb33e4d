"""Quantized checkpoints scored streamed (dequantized as each part loads) equal in-memory scoring of the same weights
dequantized up front by an independent reference, here in the test."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_streamed_giant import bi, build, calibration, group_budget
from tiny_models import tiny_llama

from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.streamed import StreamingError, collect_layer_stats_streamed

BLOCK = (16, 16)  # DeepSeek uses 128x128; 16 on these widths (40, 48, 24) leaves ragged last blocks, as 576 does
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantized_names(state: dict) -> list[str]:
    """The 2-D projection weights of the decoder layers (what DeepSeek's FP8 release quantizes)."""
    return [n for n, t in state.items() if ".layers." in n and n.endswith("proj.weight") and t.dim() == 2]


def fp8_block(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 weight_scale_inv per block, the weight dequantized by hand)."""
    rows, cols = weight.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    scale = torch.empty(grid)
    for r in range(grid[0]):
        for c in range(grid[1]):
            tile = weight[r * BLOCK[0]:(r + 1) * BLOCK[0], c * BLOCK[1]:(c + 1) * BLOCK[1]]
            scale[r, c] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
    expanded = scale.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
    q = (weight / expanded).to(torch.float8_e4m3fn)
    return q, scale, q.to(torch.float32) * expanded


def write_fp8(model, folder) -> dict:
    """Save `model` with FP8 block-scaled layer projections; returns model name -> dequantized reference weight."""
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    reference = {}
    for name in quantized_names(state):
        q, scale, deq = fp8_block(state[name])
        state[name] = q
        state[name + "_scale_inv"] = scale
        reference[name] = deq
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (folder / "config.json").write_text(json.dumps(config))
    return reference


def dequantized_model(model, reference: dict):
    """`model` with the reference weights loaded the way from_pretrained would (through its key renamings)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(out.named_parameters())
        for name, weight in reference.items():
            if name in params:
                params[name].copy_(weight)
                continue
            # Per-expert checkpoint names (model.layers.1.mlp.experts.3.gate_proj.weight) fuse into 3-D tensors.
            prefix, _, rest = name.partition(".experts.")
            index, _, proj = rest.partition(".")
            expert = int(index)
            if proj.startswith("down_proj"):
                params[f"{prefix}.experts.down_proj"][expert].copy_(weight)
            else:
                fused = params[f"{prefix}.experts.gate_up_proj"][expert]
                half = fused.shape[0] // 2
                (fused[:half] if proj.startswith("gate_proj") else fused[half:]).copy_(weight)
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_fp8_block_scaled_streamed_equals_up_front_dequantized(family, tmp_path):
    model = build(family)
    reference = write_fp8(model, tmp_path)
    assert any(".experts." in n for n in reference), "the premise: per-expert FP8 tensors are fused after dequant"
    calib = calibration()
    expected = collect_layer_stats(dequantized_model(model, reference), calib, batch_size=2, angular_span=2,
                                   progress=False)
    got = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False)
    assert got.streaming["quantization"] == "fp8"
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-7, atol=1e-12)
    # The FP8 weights moved BI: the test would notice a dequantization that returned the unquantized weights.
    unquantized = collect_layer_stats(model, calib, batch_size=2, angular_span=2, progress=False)
    assert not torch.allclose(bi(unquantized), bi(expected), rtol=1e-5, atol=0)
    # Under a budget smaller than one MoE block: dequantized group by group, same BI to rounding.
    parts = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False,
                                         memory_budget=group_budget(model, 3))
    assert parts.streaming["blocks_in_parts"]
    torch.testing.assert_close(bi(parts), bi(expected), rtol=1e-5, atol=0)


def test_fp8_dequantized_straight_to_bfloat16_equals_torchs_cast_of_the_dequantized_weights(tmp_path):
    """The kernel writes bfloat16 into the fused experts tensor, one expert's rows at a time. The oracle: the same
    pass over a bf16 checkpoint of the reference weights (dequantized in float32 by hand, cast by torch)."""
    # Every weight bf16-exact, so the tensors left unquantized (the router's float32 correction bias) read the same
    # from both checkpoints.
    model = build("deepseek_v3").to(torch.bfloat16).to(torch.float32)
    fp8_dir, bf16_dir = tmp_path / "fp8", tmp_path / "bf16"
    fp8_dir.mkdir()
    reference = write_fp8(model, fp8_dir)
    dequantized_model(model, reference).to(torch.bfloat16).save_pretrained(bf16_dir)
    calib = calibration()
    for budget in (None, group_budget(model.to(torch.bfloat16), 2)):
        got, expected = (collect_layer_stats_streamed(str(folder), calib, batch_size=2, angular_span=2,
                                                      progress=False, compute_dtype="bfloat16", memory_budget=budget)
                         for folder in (fp8_dir, bf16_dir))
        assert got.streaming["quantization"] == "fp8" and got.streaming["compute_dtype"] == "bfloat16"
        assert bool(got.streaming["blocks_in_parts"]) == (budget is not None)
        assert torch.equal(got.per_sequence, expected.per_sequence)


def test_a_weight_that_overflows_the_compute_dtype_is_refused(tmp_path):
    model = build("deepseek_v3")
    write_fp8(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = next(n for n in state if n.endswith("experts.1.down_proj.weight_scale_inv"))
    state[name] = state[name] * 1e7  # values up to ~1e6: finite in float32, inf in float16
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    collect_layer_stats_streamed(str(tmp_path), calibration(), progress=False, compute_dtype="float32")
    weight = name[: -len("_scale_inv")]
    with pytest.raises(StreamingError, match=rf"tensor {weight} holds NaN or inf values in float16; .*compute in "
                                             "float32"):
        collect_layer_stats_streamed(str(tmp_path), calibration(), progress=False, compute_dtype="float16")


def test_compressed_tensors_int4_streamed_equals_up_front_dequantized(tmp_path):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = 8
    scheme_args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    scheme = QuantizationScheme(targets=["Linear"], weights=scheme_args, format="pack-quantized")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    model = tiny_llama(num_layers=4)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    reference = {}
    for name in quantized_names(state):
        weight = state.pop(name)
        grouped = weight.reshape(weight.shape[0], -1, group)
        scale = (grouped.abs().amax(dim=-1) / 7).clamp(min=1e-8)  # symmetric int4: [-8, 7]
        reference[name] = (torch.round(grouped / scale[..., None]).clamp(-8, 7) * scale[..., None]).reshape(weight.shape)
        module = name[: -len(".weight")]
        packed = compressor.compress({"weight": weight, "weight_scale": scale}, scheme)
        state.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme_args, "format": "pack-quantized"}},
        "ignore": ["lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calib = calibration()
    expected = collect_layer_stats(dequantized_model(model, reference), calib, batch_size=2, angular_span=2,
                                   progress=False)
    got = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False)
    assert got.streaming["quantization"] == "compressed-tensors"
    unquantized = collect_layer_stats(model, calib, batch_size=2, angular_span=2, progress=False)
    assert not torch.allclose(bi(unquantized), bi(expected), rtol=1e-4, atol=0)
    torch.testing.assert_close(bi(got), bi(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-6, atol=1e-9)


def test_unsupported_quantization_is_named_with_what_is_supported(tmp_path):
    tiny_llama(num_layers=2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StreamingError, match=r"^streamed scoring cannot dequantize quant_method 'awq'; it supports "
                                             r"fp8 with weight_block_size .*compressed-tensors"):
        collect_layer_stats_streamed(str(tmp_path), calibration(), progress=False)


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_by_hand(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[experts, rows, groups, 16] e2m1 pairs (low nibble first) x 2^(scale - 127) -> [experts, groups*32, rows]:
    the OCP MX layout as gpt-oss stores it, the experts' input dimension first as its modules use them."""
    lut = torch.tensor(E2M1, dtype=torch.float64)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    values = values * torch.pow(2.0, scales.double() - 127)[..., None]
    experts, rows, groups, width = values.shape
    return values.reshape(experts, rows, groups * width).transpose(1, 2).float()


def test_mxfp4_gpt_oss_streamed_equals_up_front_dequantized(tmp_path):
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=211, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=5,
                          num_experts_per_tok=2, sliding_window=6, max_position_embeddings=128,
                          layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                          pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(name).shape
        blocks = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(121, 125, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=gen)
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
        with torch.no_grad():
            params[name].copy_(mxfp4_by_hand(blocks, scales))
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config_dict = json.loads((tmp_path / "config.json").read_text())
    config_dict["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                               "model.embed_tokens",
                                                                                               "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    calib = calibration()
    expected = collect_layer_stats(model, calib, batch_size=2, angular_span=2, progress=False)
    got = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False)
    assert got.streaming["quantization"] == "mxfp4"
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-7, atol=1e-12)
    # Under a budget below one block the packed rows of each expert group are read as slices and dequantized alone.
    parts = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False,
                                         memory_budget=group_budget(model, 2, loading=2))
    assert parts.streaming["blocks_in_parts"] == [0, 1]
    torch.testing.assert_close(bi(parts), bi(expected), rtol=1e-5, atol=0)
