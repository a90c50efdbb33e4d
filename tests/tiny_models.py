"""Tiny random configs of real transformers architectures, shared by the tests (odd sizes on purpose)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config

VOCAB = 211


def tiny_llama(num_layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=72, intermediate_size=136, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(num_layers: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=num_layers, n_head=4, n_positions=256, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_qwen3(num_layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=8, max_window_layers=num_layers // 2,
                         layer_types=layer_types, tie_word_embeddings=False, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen3": tiny_qwen3}


def random_ids(samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (samples, seq_len), generator=gen)


def tiny_llama_real_vocab(tokenizer, num_layers: int = 4, hidden_size: int = 40, intermediate_size: int = 72,
                          seed: int = 0, **config_overrides):
    """A tiny random Llama over the real SmolLM2 vocabulary, so real text, generate() and saving work quickly."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         architectures=["LlamaForCausalLM"], **config_overrides)
    return AutoModelForCausalLM.from_config(config).eval()
