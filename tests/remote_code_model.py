"""A tiny Baichuan-style remote-code model: its own configuration_*.py / modeling_*.py beside config.json, an auto_map,
and its own name for the layer count (`n_blocks`, exposed as num_hidden_layers only through attribute_map)."""
from __future__ import annotations

import json
from pathlib import Path

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyBaichuanConfig(PretrainedConfig):
    model_type = "tiny_baichuan_remote"
    attribute_map = {"num_hidden_layers": "n_blocks", "hidden_size": "width"}

    def __init__(self, vocab_size=211, width=40, n_blocks=5, n_heads=4, mlp_width=72, **kwargs):
        self.vocab_size = vocab_size
        self.width = width
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.mlp_width = mlp_width
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny_baichuan import TinyBaichuanConfig


class TinyBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.up = nn.Linear(config.width, config.mlp_width)
        self.down = nn.Linear(config.mlp_width, config.width)

    def forward(self, hidden_states, attention_mask=None):
        b, t, w = hidden_states.shape
        q, k, v = self.qkv(self.norm1(hidden_states)).view(b, t, 3, self.n_heads, w // self.n_heads).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True)
        hidden_states = hidden_states + self.proj(attn.transpose(1, 2).reshape(b, t, w))
        return hidden_states + self.down(nn.functional.gelu(self.up(self.norm2(hidden_states))))


class TinyBaichuanPreTrainedModel(PreTrainedModel):
    config_class = TinyBaichuanConfig
    base_model_prefix = "model"


class TinyBaichuanModel(TinyBaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(TinyBlock(config) for _ in range(config.n_blocks))
        self.norm = nn.LayerNorm(config.width)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return self.norm(hidden_states)


class TinyBaichuanForCausalLM(TinyBaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyBaichuanModel(config)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask)))
'''


def write_remote_code_model(folder: Path, tokenizer=None, n_blocks: int = 5, seed: int = 0) -> Path:
    """Write the model (random weights, seeded) to `folder` as save_pretrained would with its code beside it, and
    `tokenizer` (its vocabulary sizes the model; 211 ids without one) so the folder loads like a hub checkpoint."""
    import torch
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tiny_baichuan.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny_baichuan.py").write_text(MODELING)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny_baichuan_remote", "architectures": ["TinyBaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tiny_baichuan.TinyBaichuanConfig",
                     "AutoModelForCausalLM": "modeling_tiny_baichuan.TinyBaichuanForCausalLM"},
        "vocab_size": len(tokenizer) if tokenizer is not None else 211, "width": 40, "n_blocks": n_blocks, "n_heads": 4, "mlp_width": 72,
    }))
    model_cls = get_class_from_dynamic_module("modeling_tiny_baichuan.TinyBaichuanForCausalLM", str(folder))
    config = model_cls.config_class.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    # save_pretrained rewrote config.json through the config class; the layer count stays under its own name.
    assert "n_blocks" in json.loads((folder / "config.json").read_text())
    return folder
