"""Measured architecture support: every family through the whole path, on tiny random models built here.

Each family's tiny config is built with transformers' own config class (odd small sizes, 4-6 layers), so the table
reflects the installed transformers, not a claim. `run_family` walks the seven steps of issue #7 and records, per
step, either PASS or the one-line reason it failed; a step whose prerequisite failed says so instead of vanishing.
`shortgpt-fast archs` prints the table and the README embeds the same table, checked by tests/test_architectures.py.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

PASS = "✔"
STEPS = ("score", "streamed", "same ranking", "prune", "cut copy+in-place", "reload", "generate")
NOT_APPLICABLE = "n/a (encoder-only)"
VOCAB = 211
REMOVE = 2  # layers removed per family: two, so renumbering past a gap is exercised, not only a tail cut
README_START = "<!-- archs:start -->"
README_END = "<!-- archs:end -->"


@dataclass(frozen=True)
class Family:
    name: str
    make_config: Callable[[], object]
    # Encoder-only families are scored and cut, but have no generate() and no next-token logits.
    generative: bool = True
    model_class: Optional[str] = None  # transformers class name when AutoModelForCausalLM is not the right one
    # Layers to remove instead of the BI pick. Random weights make that pick arbitrary, often the tail, which would
    # leave the per-layer config rewrite (MoE patterns, leading-dense counts) untested.
    remove: Optional[tuple[int, ...]] = None


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
    Family("gemma3", _gemma3),
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
    Family("bert", _bert, generative=False, model_class="BertForMaskedLM"),
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


def calibration(seed: int = 1):
    from ..data.calibration import from_tensors

    gen = torch.Generator().manual_seed(seed)
    # Longer than the sliding windows above, so per-layer window masks matter; no padding, because state-space
    # families ignore the attention mask and would then disagree with themselves for reasons unrelated to pruning.
    return from_tensors(torch.randint(3, VOCAB, (4, 13), generator=gen))


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    # The table cell has to stay one line and readable; the full error is one rerun away.
    line = line.replace("|", "/")
    return line if len(line) <= 110 else line[:107] + "..."


@dataclass
class FamilyResult:
    family: str
    steps: dict = field(default_factory=dict)  # step name -> PASS or reason
    removed: list = field(default_factory=list)

    def row(self) -> list[str]:
        return [self.family] + [self.steps.get(step, "not run") for step in STEPS]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload(folder: Path, family: Family):
    import transformers

    cls = getattr(transformers, family.model_class) if family.model_class else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise AssertionError(f"loading {folder.name}: {problems}")
    return model.eval()


def run_family(family: Family, workdir: Optional[Path] = None) -> FamilyResult:
    """All seven steps for one family; never raises, every step ends as PASS or its reason."""
    from ..scoring.block_influence import collect_layer_stats
    from ..scoring.report import Scores
    from ..scoring.streamed import collect_layer_stats_streamed
    from ..surgery.checkpoint import cut_checkpoint
    from ..surgery.in_memory import prune_model

    result = FamilyResult(family.name)
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"archs-{family.name}-")) if owned else Path(workdir)
    state: dict = {}

    def step(name: str, needs: tuple[str, ...], fn: Callable[[], None]) -> None:
        failed = [n for n in needs if result.steps.get(n) != PASS]
        if failed:
            result.steps[name] = f"needs {', '.join(failed)}"
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            result.steps[name] = PASS
        except Exception as err:  # noqa: BLE001 - the table's job is to report any failure, whatever its type
            result.steps[name] = _reason(err)

    calib = calibration()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))

    def build_and_save():
        model = build_model(family)
        original = workdir / "original"
        model.save_pretrained(original, max_shard_size="40KB")
        state["model"], state["original"] = model, original

    def score():
        stats = collect_layer_stats(state["model"], calib, batch_size=3, angular_span=2, progress=False)
        state["ranking"] = Scores(model=family.name, stats=stats, calibration={}).ranking("bi")

    def streamed():
        stats = collect_layer_stats_streamed(str(state["original"]), calib, batch_size=3, angular_span=2,
                                             progress=False)
        state["streamed_ranking"] = Scores(model=family.name, stats=stats, calibration={}).ranking("bi")

    def same_ranking():
        if state["ranking"] != state["streamed_ranking"]:
            raise AssertionError(f"in memory {state['ranking']} != streamed {state['streamed_ranking']}")

    def prune():
        result.removed = sorted(family.remove or state["ranking"][:REMOVE])
        prune_model(state["model"], result.removed)
        state["pruned_logits"] = _logits(state["model"], ids)

    def cut():
        copied = workdir / "cut-copy"
        cut_checkpoint(state["original"], result.removed, out=copied, verify=True)
        in_place = workdir / "cut-in-place"
        shutil.copytree(state["original"], in_place)
        cut_checkpoint(in_place, result.removed, in_place=True, verify=True)
        state["outputs"] = {"copy": copied, "in-place": in_place}

    def reload():
        expected = state["pruned_logits"]
        for mode, folder in state["outputs"].items():
            got = _logits(_reload(folder, family), ids)
            if not torch.equal(got, expected):
                diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
                raise AssertionError(f"{mode} cut: logits differ from the in-memory pruned model (max {diff})")

    def generate():
        model = state["model"]
        prompt = ids[:1, :6]
        kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            cached = model.generate(prompt, use_cache=True, **kwargs)
            uncached = model.generate(prompt, use_cache=False, **kwargs)
        if not torch.equal(cached, uncached):
            raise AssertionError(f"generate with cache {cached[0, 6:].tolist()} != without {uncached[0, 6:].tolist()}")

    try:
        step("score", (), lambda: (build_and_save(), score()))
        step("streamed", ("score",), streamed)
        step("same ranking", ("score", "streamed"), same_ranking)
        step("prune", ("score",), prune)
        step("cut copy+in-place", ("prune",), cut)
        step("reload", ("cut copy+in-place",), reload)
        if family.generative:
            step("generate", ("prune",), generate)
        else:
            result.steps["generate"] = NOT_APPLICABLE
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def run_all(names=None) -> list[FamilyResult]:
    return [run_family(FAMILIES[name]) for name in (names or FAMILIES)]


def format_table(results: list[FamilyResult]) -> str:
    import transformers

    header = ["family", *STEPS]
    lines = [f"Measured with transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r.row()) + " |" for r in results]
    return "\n".join(lines)


TABLE_START = "<!-- archs:table:start -->"
TABLE_END = "<!-- archs:table:end -->"


def readme_table(readme_text: str) -> str:
    """The generated table inside the README's archs section; the prose around it is free text."""
    section = readme_text[readme_text.index(README_START) + len(README_START):readme_text.index(README_END)]
    return section[section.index(TABLE_START) + len(TABLE_START):section.index(TABLE_END)].strip()


def with_readme_table(readme_text: str, table: str) -> str:
    head, rest = readme_text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}"


def _run_archs_command(args: argparse.Namespace) -> int:
    results = run_all(args.family or None)
    table = format_table(results)
    print(table)
    if args.write_readme:
        if args.family:
            raise ValueError("--write-readme records the whole matrix; drop --family")
        path = Path(args.write_readme)
        path.write_text(with_readme_table(path.read_text(), table))
    return 0


def add_archs_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "archs", help="run every supported family through score/stream/prune/cut/reload/generate and print the table",
        description="Build a tiny random model of each family with the installed transformers and run the whole "
                    "pipeline on it; each cell is ✔ or the reason that step failed.")
    p.add_argument("--family", action="append", choices=sorted(FAMILIES),
                   help="only this family (repeatable); default: all")
    p.add_argument("--write-readme", metavar="README", help="also replace the table between the archs markers")
    p.set_defaults(func=_run_archs_command)
    return p
