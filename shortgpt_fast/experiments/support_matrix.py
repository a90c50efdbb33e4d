"""Measured architecture support: every causal-LM model type transformers ships, through the whole path.

One row per model type in transformers' causal-LM auto mapping, built tiny from the config class's own defaults
(`tiny_configs.py`), plus the hand-written families below (known-good configs, also used by other tests) and older
config forms still found on the hub. `run_model_type` walks one row through score, streamed score, in-memory prune,
save/reload, cut (copy and in place) and generate, and judges every step against the identity-skip oracle: the
original model with the removed blocks returning their input (`identity_oracle.py`). Logits must be equal bit for
bit; anything else is WRONG, loudly, because a silent mismatch is the failure this matrix exists to catch. An error
whose class is defined in shortgpt_fast is a deliberate refusal; any other error is a failure. A type that cannot be
built tiny is listed as untested with the reason, never dropped. `shortgpt-fast archs` prints the table and
`--write-readme` puts it in the README; tests/experiments/test_architectures.py checks both.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

PASS = "✔"
SKIPPED = "—"
STEPS = ("score", "streamed", "prune", "reload", "cut", "cut in-place", "generate")
NOT_APPLICABLE = "n/a (encoder-only)"
VOCAB = 211
REMOVE = 2  # layers removed per row: two, so renumbering past a gap is exercised, not only a tail cut
# A tiny model above this is a shrinker that missed a size field; running it would blow the CI budget.
MAX_PARAMS = 3_000_000
README_START = "<!-- archs:start -->"
README_END = "<!-- archs:end -->"
TABLE_START = "<!-- archs:table:start -->"
TABLE_END = "<!-- archs:table:end -->"


@dataclass(frozen=True)
class Family:
    """A hand-written tiny config: known good, used by other tests too (tests/scoring/test_streamed.py)."""

    name: str
    make_config: Callable[[], object]
    # Encoder-only families are scored and cut, but have no generate() and no next-token logits.
    generative: bool = True
    model_class: Optional[str] = None  # transformers class name when AutoModelForCausalLM is not the right one
    # Fixed removals (not the BI pick, which random weights make arbitrary, often the tail): chosen so the pattern
    # fields (sliding/full, MoE steps, leading dense counts) have to be rewritten.
    remove: tuple[int, ...] = (1, 3)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=5,
                       num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
                       tie_word_embeddings=False, pad_token_id=0)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=88, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                         sliding_window=7, tie_word_embeddings=False, pad_token_id=0)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=5,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, pad_token_id=0)


def _qwen3():
    from transformers import Qwen3Config
    layers = 6
    return Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                       use_sliding_window=True, sliding_window=7, max_window_layers=3,
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                       tie_word_embeddings=False, pad_token_id=0)


def _gemma3():
    from transformers import Gemma3TextConfig
    layers = 5
    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                            sliding_window=5,
                            layer_types=["full_attention" if i % 3 == 2 else "sliding_attention"
                                         for i in range(layers)],
                            pad_token_id=0)


def _phi3():
    from transformers import Phi3Config
    return Phi3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      original_max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=VOCAB, n_embd=44, n_layer=5, n_head=4, n_positions=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=1)


def _gpt_neox():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=88, num_hidden_layers=5,
                         num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def _opt():
    from transformers import OPTConfig
    return OPTConfig(vocab_size=VOCAB, hidden_size=40, ffn_dim=72, num_hidden_layers=5, num_attention_heads=4,
                     word_embed_proj_dim=40, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                     eos_token_id=1)


def _falcon():
    from transformers import FalconConfig
    return FalconConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=5, num_attention_heads=4,
                        num_kv_heads=1, multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                        bias=False, alibi=False, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=1)


def _mixtral():
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         num_local_experts=3, num_experts_per_tok=2, sliding_window=None,
                         tie_word_embeddings=False, pad_token_id=0)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig
    # Step 2 makes layers 1, 3, 5 MoE and mlp_only_layers forces 3 dense: a pattern removal must rewrite.
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, moe_intermediate_size=24,
                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                          max_position_embeddings=128, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                          decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
                          tie_word_embeddings=False, pad_token_id=0)


def _deepseek_v3():
    from transformers import DeepseekV3Config
    return DeepseekV3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                            num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                            n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                            first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=12, head_dim=8, max_position_embeddings=128,
                            tie_word_embeddings=False, pad_token_id=0)


def _mamba():
    from transformers import MambaConfig
    return MambaConfig(vocab_size=VOCAB, hidden_size=40, state_size=6, num_hidden_layers=5, expand=2, conv_kernel=3,
                       pad_token_id=0, bos_token_id=1, eos_token_id=1, use_mambapy=True)


def _rwkv():
    from transformers import RwkvConfig
    return RwkvConfig(vocab_size=VOCAB, hidden_size=40, attention_hidden_size=40, intermediate_size=72,
                      num_hidden_layers=5, context_length=128, rescale_every=0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=1)


def _bert():
    from transformers import BertConfig
    return BertConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=5,
                      num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", _llama),
    Family("mistral", _mistral),
    Family("qwen2", _qwen2),
    Family("qwen3", _qwen3),
    Family("gemma3_text", _gemma3),
    Family("phi3", _phi3),
    Family("gpt2", _gpt2),
    Family("gpt_neox", _gpt_neox),
    Family("opt", _opt),
    Family("falcon", _falcon),
    Family("mixtral", _mixtral),
    Family("qwen3_moe", _qwen3_moe, remove=(0, 3)),
    Family("deepseek_v3", _deepseek_v3, remove=(1, 3)),
    Family("mamba", _mamba),
    Family("rwkv", _rwkv),
    Family("bert (masked LM)", _bert, generative=False, model_class="BertForMaskedLM"),
)}




def build_model(family: Family, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = family.make_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family.model_class:
            model = getattr(transformers, family.model_class)(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Rows of the matrix


@dataclass(frozen=True)
class Row:
    name: str  # the model type, or "type (form)" for a variant
    model_type: str
    make_config: Callable[[], object]
    remove: tuple[int, ...] = (1, 4)
    generative: bool = True
    model_class: Optional[str] = None
    # Streamed scoring reloads the checkpoint block by block; it runs for the hand-written families only, which
    # keeps the matrix inside its CI budget while every loader quirk those families cover stays tested.
    streamed: bool = False
    # Rewrites the saved config.json into an older form (the one hub checkpoints still carry), so the cut sees
    # what users feed it rather than what transformers 5 writes.
    old_form: Optional[Callable[[dict], dict]] = None
    # Puts a freshly built model into a state its forward accepts (e.g. X-MOD's language adapter).
    prepare: Optional[Callable[[object], None]] = None


def _generic(model_type: str, **overrides):
    from .tiny_configs import tiny_config

    return lambda: tiny_config(model_type, overrides)


def _set_language(model) -> None:
    model.set_default_language(next(iter(model.config.languages)))


# Types whose built model needs one call before its forward runs on bare input ids.
PREPARE: dict[str, Callable[[object], None]] = {"xmod": _set_language}
# Removal other than (1, 4) where the default pattern of the tiny config makes (1, 4) uninteresting.
REMOVE_OVERRIDES: dict[str, tuple[int, ...]] = {}


def _gemma3_old_form(cfg: dict) -> dict:
    cfg.pop("layer_types", None)
    cfg["sliding_window_pattern"] = 3
    return cfg


def _cohere2_old_form(cfg: dict) -> dict:
    cfg.pop("layer_types", None)
    cfg["sliding_window_pattern"] = 3
    return cfg


def _qwen3_next_old_form(cfg: dict) -> dict:
    cfg.pop("layer_types", None)
    cfg["full_attention_interval"] = 3
    return cfg


KIMI_FULL_1_BASED = [3, 6]


def _kimi_old_form(cfg: dict) -> dict:
    layers = cfg["num_hidden_layers"]
    cfg.pop("layer_types", None)
    # As released: head sizes and the layer split live in a nested dict whose layer numbers start at 1.
    cfg["linear_attn_config"] = {
        "full_attn_layers": KIMI_FULL_1_BASED,
        "kda_layers": [i for i in range(1, layers + 1) if i not in KIMI_FULL_1_BASED],
        "head_dim": cfg["linear_head_dim"], "num_heads": cfg["linear_num_heads"],
        "short_conv_kernel_size": cfg["linear_conv_kernel_dim"],
    }
    return cfg


KOLIBRI_SHARED_KV = ["indexed_attention", "indexed_attention", "sliding_attention", "indexed_attention",
                     "indexed_attention", "sliding_attention"]


def _old_form_config(model_type: str, rewrite: Callable[[dict], dict], **overrides):
    """The tiny config of `model_type`, rebuilt from its older-form dict, so memory and checkpoint agree."""
    def make():
        from transformers import CONFIG_MAPPING

        current = _generic(model_type, **overrides)().to_dict()
        for key in ("transformers_version", "architectures", "model_type"):
            current.pop(key, None)
        return CONFIG_MAPPING[model_type](**rewrite(current))
    return make


def _variants() -> list[Row]:
    return [
        Row("gemma3_text (sliding_window_pattern)", "gemma3_text",
            _old_form_config("gemma3_text", _gemma3_old_form), old_form=_gemma3_old_form),
        Row("cohere2 (sliding_window_pattern)", "cohere2",
            _old_form_config("cohere2", _cohere2_old_form), old_form=_cohere2_old_form),
        Row("qwen3_next (full_attention_interval)", "qwen3_next",
            _old_form_config("qwen3_next", _qwen3_next_old_form), old_form=_qwen3_next_old_form),
        Row("kimi_linear (linear_attn_config)", "kimi_linear",
            _old_form_config("kimi_linear", _kimi_old_form), old_form=_kimi_old_form),
        # Layers 1 and 3 read layer 0's K/V and layer 0, 3 and 4 run indexers: the cut renumbers sources and indexers.
        Row("kolibri1_1 (shared K/V)", "kolibri1_1", _generic("kolibri1_1", layer_types=KOLIBRI_SHARED_KV, index_layers=[0, 3, 4],
                                                 kv_source_layers=[0, 0, 2, 0, 4, 5])),
        # Five layers: as many as falcon_h1's five (non-per-layer) ssm_multipliers.
        Row("falcon_h1 (5 layers)", "falcon_h1", _generic("falcon_h1", num_hidden_layers=5), remove=(1, 3)),
    ]


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _build_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    hand_written = {f.name: f for f in FAMILIES.values()}
    for model_type in causal_lm_types():
        family = hand_written.pop(model_type, None)
        if family is not None:
            rows[model_type] = Row(model_type, model_type, family.make_config, family.remove, family.generative,
                                   family.model_class, streamed=True)
        else:
            rows[model_type] = Row(model_type, model_type, _generic(model_type),
                                   REMOVE_OVERRIDES.get(model_type, (1, 4)), prepare=PREPARE.get(model_type))
    for family in hand_written.values():  # hand-written forms the auto mapping has no causal-LM entry for
        rows[family.name] = Row(family.name, family.name.split(" ")[0], family.make_config, family.remove,
                                family.generative, family.model_class, streamed=True)
    for row in _variants():
        rows[row.name] = row
    return rows


_ROWS: Optional[dict[str, Row]] = None


def rows() -> dict[str, Row]:
    """Every row, in table order: the auto mapping's order, then hand-written extras, then older config forms."""
    global _ROWS
    if _ROWS is None:
        _ROWS = _build_rows()
    return _ROWS


# ---------------------------------------------------------------------------------------------------------------
# Outcomes


class Wrong(Exception):
    """Ran, but computes something other than the oracle: the loud status."""


class Broken(Exception):
    """Failed in a way that shows (missing keys on load, a crash) without being a deliberate refusal."""


class Untested(Exception):
    """The tiny model could not be built or run before any of our code was involved."""


class _AsBefore(Exception):
    """Generation misbehaves on the unpruned model too: a transformers limitation, not a pruning bug."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    # Validation errors put a generic line first ("Class validation error for validator ...:") and the reason next.
    return lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _clip(line: str, width: int = 110) -> str:
    # A table cell has to stay one line and readable; the full error is one `archs --type T` away.
    line = " ".join(line.replace("|", "/").split())
    return line if len(line) <= width else line[:width - 3] + "..."


def is_refusal(err: BaseException) -> bool:
    """A ShortGPT error class raised on purpose (ConfigSurgeryError, SurgeryError, ArchitectureError, ...)."""
    return (type(err).__module__.split(".")[0] == "shortgpt_fast"
            and not isinstance(err, (Wrong, Broken, Untested, _AsBefore)))


def describe(err: BaseException) -> str:
    if isinstance(err, _AsBefore):
        return _clip(f"as before prune: {_first_line(err)}")
    if isinstance(err, Wrong):
        return _clip(f"WRONG: {_first_line(err)}")
    if isinstance(err, Untested):
        return _clip(f"untested: {_first_line(err)}")
    if is_refusal(err):
        # Some refusals already say so; one "refused:" is enough in a table cell.
        text = _first_line(err)
        return _clip(f"refused: {text[len('refused: '):] if text.startswith('refused: ') else text}")
    if isinstance(err, Broken):
        return _clip(_first_line(err))
    text = _first_line(err)
    return _clip(f"{type(err).__name__}: {text}" if text else type(err).__name__)


def cell_kind(cell: str) -> str:
    """pass, skipped, refused, wrong, untested, blocked (a prerequisite failed) or fail."""
    if cell == PASS:
        return "pass"
    if cell in (SKIPPED, NOT_APPLICABLE) or cell.startswith("as before prune:"):
        return "skipped"
    for prefix, kind in (("refused:", "refused"), ("WRONG:", "wrong"), ("untested:", "untested"),
                         ("needs ", "blocked")):
        if cell.startswith(prefix):
            return kind
    return "fail"


@dataclass
class Result:
    name: str
    model_type: str
    steps: dict = field(default_factory=dict)  # step -> PASS, SKIPPED, or a one-line reason
    untested: Optional[str] = None  # the whole row, when the tiny model could not be built
    removed: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        """untested, WRONG, fail, refused or pass: the worst cell decides."""
        if self.untested is not None:
            return "untested"
        kinds = {cell_kind(c) for c in self.steps.values()}
        for kind, label in (("wrong", "WRONG"), ("fail", "fail"), ("refused", "refused")):
            if kind in kinds:
                return label
        return "pass"

    def row(self) -> list[str]:
        if self.untested is not None:
            return [self.name, self.untested] + [""] * len(STEPS)
        summary = {"pass": PASS, "refused": "refused", "WRONG": "**WRONG**", "fail": "fail"}[self.outcome]
        return [self.name, summary] + [self.steps.get(step, "not run") for step in STEPS]


# ---------------------------------------------------------------------------------------------------------------
# Running one row


def calibration(seed: int = 1):
    from ..data.calibration import from_tensors

    gen = torch.Generator().manual_seed(seed)
    # Longer than the tiny sliding windows and chunks (5-7), so per-layer window masks matter; ids stay below the
    # special ids the shrinker parks at the top of the vocabulary. No padding: state-space families ignore the mask.
    return from_tensors(torch.randint(3, VOCAB - 12, (4, 13), generator=gen))


def _test_ids():
    return torch.randint(3, VOCAB - 12, (2, 11), generator=torch.Generator().manual_seed(2))


@contextmanager
def _quiet_single_thread():
    """Tiny models run fastest on one thread, and xdist workers would otherwise fight over the two cores."""
    import logging

    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        logging.disable(previous)
        torch.set_num_threads(threads)


def _perturb(model, seed: int) -> None:
    """Move every weight off its init value: zero-initialised projections or unit norms would make a wrongly
    assigned layer type or a reinitialised missing tensor compute the same thing as the right one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.02)


def _model_class(row: Row):
    import transformers

    return getattr(transformers, row.model_class) if row.model_class else transformers.AutoModelForCausalLM


def _logits(model, ids) -> torch.Tensor:
    import inspect

    kwargs = {"input_ids": ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def _check_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if got.shape != expected.shape:
        raise Wrong(f"{what}: logits shape {tuple(got.shape)} != oracle {tuple(expected.shape)}")
    if not torch.equal(got, expected):
        delta = (got.double() - expected.double()).abs().nan_to_num(nan=math.inf).max().item()
        raise Wrong(f"{what}: max Δ {delta:.3g} vs the oracle")


def _load(folder: Path, row: Row, what: str, cls):
    # The built model's own class: a few CausalLMs (emu3) save a config type the auto mapping does not list.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {k.replace("_keys", ""): len(v) for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        first = sorted(info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"))[0]
        detail = ", ".join(f"{n} {k}" for k, n in problems.items())
        raise Broken(f"{what} loads with {detail} keys (e.g. {first})")
    # Tensors read from safetensors sit at whatever offset the file gives them, and CPU GEMM kernels round
    # differently on unaligned data (one ulp, seen on granitemoeshared). Fresh copies are aligned like the
    # in-memory model's, so a difference that remains is the checkpoint's, not the allocator's.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    if row.prepare:
        row.prepare(model)
    return model.eval()


def _block_io_reference(model, calib) -> torch.Tensor:
    """Per-layer token-mean BI in float64 from plain hooks on one unbatched forward: independent of the scorer."""
    from ..models.architectures import find_block_stack
    from ..models.identity_oracle import block_input

    blocks = find_block_stack(model).blocks
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    batch, seq_len = calib.input_ids.shape

    def per_token(t: torch.Tensor) -> torch.Tensor:
        # One row per token: find the (batch, seq) axis pair, bring it to the front, and flatten whatever else there
        # is (several residual streams: DeepSeek-V4 [B, S, N, D], Gemma-3n [N, B, S, D]) into the row.
        t = t.double()
        for k in range(t.dim() - 1):
            if tuple(t.shape[k:k + 2]) == (batch, seq_len):
                return t.movedim((k, k + 1), (0, 1)).reshape(batch * seq_len, -1)
        if tuple(t.shape[:2]) == (seq_len, batch):  # sequence-first (XLNet)
            return t.transpose(0, 1).reshape(batch * seq_len, -1)
        raise AssertionError(f"reference: no (batch, seq) axes in a hidden state of shape {list(t.shape)}")

    def hook_for(i):
        def hook(module, args, kwargs, output):
            a = per_token(block_input(args, kwargs))
            b = per_token(output if isinstance(output, torch.Tensor) else output[0])
            # The scorer's convention for a zero row (ops/bi_reduce.py): cos = dot / EPS, so BI 1, not NaN.
            cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).clamp(-1, 1)
            sums[i] += (1 - cos).sum()
            counts[i] += a.shape[0]
        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        _logits(model, calib.input_ids)
    finally:
        for h in handles:
            h.remove()
    # A block the forward never called (Mllama's cross-attention layers without an image) passed its input on
    # unchanged: every token has cos 1, so BI 0, not 0/0.
    return torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)


def _generate(model, prompt) -> torch.Tensor:
    pad = getattr(model.config, "pad_token_id", None)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=pad if isinstance(pad, int) else 0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    if not torch.equal(cached, uncached):
        return cached, uncached
    return None


def run_model_type(name: str, workdir: Optional[Path] = None) -> Result:
    """One row of the matrix; never raises: every step ends as ✔, a refusal, WRONG, or its failure."""
    import time

    row = rows()[name]
    started = time.perf_counter()
    result = Result(row.name, row.model_type, removed=sorted(row.remove))
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="archs-")) if owned else Path(workdir)
    try:
        with _quiet_single_thread():
            _run(row, result, workdir)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
        result.seconds = time.perf_counter() - started
    return result


def _build(row: Row, workdir: Path) -> dict:
    """Config, model, a plain forward and the saved original; any failure here makes the row untested."""
    def stage(what, fn):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - whatever transformers raises, the row reports it
            raise Untested(f"{what}: {describe(err)}") from err

    config = stage("config", row.make_config)

    def make():
        torch.manual_seed(0)
        return _model_class(row)(config) if row.model_class else _model_class(row).from_config(config)

    def count_on_meta():
        # Counting on the meta device costs no memory and no init, so an oversized type is rejected in
        # milliseconds instead of after seconds of random initialisation.
        with torch.device("meta"):
            return sum(p.numel() for p in make().parameters())

    params = stage("model", count_on_meta)
    if params > MAX_PARAMS:
        raise Untested(f"{params / 1e6:.1f} M parameters even when shrunk (limit {MAX_PARAMS / 1e6:.0f} M)")
    model = stage("model", make).eval()
    _perturb(model, seed=3)
    if row.prepare:
        stage("prepare", lambda: row.prepare(model))
    ids = _test_ids()
    stage("forward", lambda: _logits(model, ids))
    original = workdir / "original"
    stage("save_pretrained", lambda: model.save_pretrained(original, max_shard_size="40KB"))
    if row.old_form:
        path = original / "config.json"
        path.write_text(json.dumps(row.old_form(json.loads(path.read_text())), indent=2))
    return {"model": model, "original": original, "ids": ids, "cls": type(model)}


def _run(row: Row, result: Result, workdir: Path) -> None:
    from ..models.identity_oracle import identity_logits
    from ..scoring.block_influence import collect_layer_stats
    from ..scoring.streamed import collect_layer_stats_streamed
    from ..surgery.checkpoint import cut_checkpoint
    from ..surgery.in_memory import prune_model

    try:
        state = _build(row, workdir)
    except Untested as err:
        result.untested = describe(err)
        return
    model, ids, remove = state["model"], state["ids"], list(row.remove)

    def step(name: str, needs: tuple[str, ...], fn: Callable[[], None]) -> None:
        failed = [n for n in needs if result.steps.get(n) != PASS]
        if failed:
            result.steps[name] = f"needs {', '.join(failed)}"
            return
        try:
            fn()
            result.steps[name] = PASS
        except Exception as err:  # noqa: BLE001 - the table's job is to report any failure, whatever its type
            # Temporary folder names would make the table differ on every run.
            result.steps[name] = describe(err).replace(f"{workdir}/", "")

    calib = calibration()

    def score():
        stats = collect_layer_stats(model, calib, batch_size=3, angular_span=2, progress=False)
        per_layer = stats.per_sequence.sum(dim=1)
        ours = per_layer[:, 1] / per_layer[:, 0]
        reference = _block_io_reference(model, calib)
        # Different reductions (law of cosines in float32 rows vs dot products in float64): agreement to 1e-5
        # relative is what tests/test_scoring.py holds the scorer to; a wrong block input is off by far more.
        if ours.shape != reference.shape or not torch.allclose(ours, reference, rtol=1e-5, atol=1e-7):
            worst = (ours - reference).abs().max().item() if ours.shape == reference.shape else math.inf
            raise Wrong(f"BI differs from the float64 hook reference (max Δ {worst:.3g})")
        state["stats"] = stats

    def streamed():
        got = collect_layer_stats_streamed(str(state["original"]), calib, batch_size=3, angular_span=2,
                                           progress=False)
        expected = state["stats"].per_sequence
        # Same kernels on the same shapes as in memory: tests/scoring/test_streamed.py holds the two to 1e-7.
        if not torch.allclose(got.per_sequence, expected, rtol=1e-7, atol=1e-12):
            raise Wrong(f"streamed stats differ from in-memory (max Δ "
                        f"{(got.per_sequence - expected).abs().max().item():.3g})")

    def oracle():
        kwargs = {"use_cache": False} if _takes_cache(model) else {}
        state["expected"] = identity_logits(model, remove, ids, **kwargs)

    def prune():
        prune_model(model, remove)
        _check_equal(_logits(model, ids), state["expected"], "pruned in memory")

    def _check_loaded(loaded, what: str) -> None:
        _check_equal(_logits(loaded, ids), state["expected"], what)

    def reload():
        folder = workdir / "pruned"
        model.save_pretrained(folder)
        _check_loaded(_load(folder, row, "the saved pruned model", state["cls"]), "save_pretrained + from_pretrained")

    def cut():
        folder = workdir / "cut-copy"
        cut_checkpoint(state["original"], remove, out=folder, verify=True)
        _check_loaded(_load(folder, row, "the cut checkpoint", state["cls"]), "cut checkpoint")

    def cut_in_place():
        folder = workdir / "cut-in-place"
        shutil.copytree(state["original"], folder)
        cut_checkpoint(folder, remove, in_place=True, verify=True)
        _check_loaded(_load(folder, row, "the in-place cut", state["cls"]), "in-place cut")

    def generate():
        prompt = ids[:1, :6]
        try:
            differs = _generate(model, prompt)
        except Exception as err:  # noqa: BLE001
            before = _generation_before_prune(row, state, prompt)
            if before is not None:
                raise _AsBefore(before) from err
            raise
        if differs is None:
            return
        cached, uncached = differs
        before = _generation_before_prune(row, state, prompt)
        if before is not None:
            raise _AsBefore(before)
        raise Wrong(f"generate with cache {cached[0, 6:].tolist()} != without {uncached[0, 6:].tolist()}")

    step("score", (), score)
    if row.streamed:
        step("streamed", ("score",), streamed)
    else:
        result.steps["streamed"] = SKIPPED
    try:
        oracle()
    except Exception as err:  # noqa: BLE001 - without an oracle nothing after scoring can be judged
        reason = describe(err)
        for name in ("prune", "reload", "cut", "cut in-place", "generate"):
            result.steps[name] = reason if is_refusal(err) else f"oracle failed: {reason}"
        return
    step("prune", (), prune)
    step("reload", ("prune",), reload)
    step("cut", (), cut)
    step("cut in-place", (), cut_in_place)
    if row.generative:
        step("generate", ("prune",), generate)
    else:
        result.steps["generate"] = NOT_APPLICABLE


def _generation_before_prune(row: Row, state: dict, prompt) -> Optional[str]:
    """Why generation fails on the original model, or None when it works there (then pruning broke it)."""
    try:
        differs = _generate(_load(state["original"], row, "the original", state["cls"]), prompt)
    except Exception as err:  # noqa: BLE001
        return describe(err)
    if differs is not None:
        return "cache ≠ no cache"
    return None


def _takes_cache(model) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters


def run_all(names=None, on_row=None) -> list[Result]:
    """Rows `names` (default: all), in order; `on_row(result)` is called as each finishes.

    Raises ValueError naming unknown rows before any runs."""
    names = list(names or rows())
    unknown = [n for n in names if n not in rows()]
    if unknown:
        raise ValueError(f"unknown model type(s) {unknown}; `shortgpt-fast archs --list` shows the rows")
    results = []
    for name in names:
        results.append(run_model_type(name))
        if on_row is not None:
            on_row(results[-1])
    return results


# ---------------------------------------------------------------------------------------------------------------
# The table


HEADER = ("model type", "result", *STEPS)


def format_table(results: list[Result]) -> str:
    import transformers

    counts = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{counts[k]} {k}" for k in ("pass", "refused", "WRONG", "fail", "untested") if k in counts)
    lines = [f"Measured with transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}: "
             f"{summary}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += [format_row(r) for r in results]
    return "\n".join(lines)


def format_row(result: Result) -> str:
    return "| " + " | ".join(result.row()) + " |"


def readme_table(readme_text: str) -> str:
    """The generated table inside the README's archs section; the prose around it is free text."""
    section = readme_text[readme_text.index(README_START) + len(README_START):readme_text.index(README_END)]
    return section[section.index(TABLE_START) + len(TABLE_START):section.index(TABLE_END)].strip()


def readme_rows(readme_text: str) -> dict[str, str]:
    """Row name -> the README's table line for it."""
    out = {}
    for line in readme_table(readme_text).splitlines():
        if line.startswith("| ") and not line.startswith("| model type |"):
            out[line[2:].split(" | ", 1)[0]] = line
    return out


def write_readme_table(readme: Path, table: str) -> None:
    """Replace the table between the archs markers of `readme` with `table`."""
    readme.write_text(with_readme_table(readme.read_text(), table))


def with_readme_table(readme_text: str, table: str) -> str:
    head, rest = readme_text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}"
