"""The embedded tiny base model: a character-level tokenizer and a small Qwen2 model pretrained on search traces.

Both are built from scratch with no hub: the tokenizer with the `tokenizers` library (saved as standard Hugging
Face tokenizer files) and the model from a `transformers.Qwen2Config`. Tests use :func:`build_tiny_random` for a
random model. :func:`pretrain` (``tokenmdp pretrain``) trains one on the derivational traces of
:mod:`tokenmdp.policy.traces` (loss on the completion only, EOS at the end) with AdamW and a warmup + cosine
schedule, and saves it atomically as a folder that loads with ``AutoModelForCausalLM.from_pretrained``.
:func:`ensure_tiny_base` finds the default base model in a cache folder or builds it there. The training pieces
are in :mod:`tokenmdp.policy.tiny_train`;
:func:`tokenmdp.policy.tiny_eval.measure_base` measures how much room it leaves for RL.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.tiny_train import TraceStream, default_threads, train_loop
from tokenmdp.policy.traces import check_settings

PAD = "<pad>"
EOS = "<|endoftext|>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
META_FILE = "tokenmdp.json"
BASE_NAME = "tiny-countdown-v3"
TRACE_TASKS = ("countdown",)

# The embedded default base model (ensure_tiny_base): chosen so that it trains in a few minutes on 2 CPU cores
# and lands with room for RL (see benchmarks/RESULTS.md, "Tiny base model"). Countdown with 3 numbers in 1..10
# and targets <= 100; a fifth of the number sets is held out (test_fraction 0.2): 2,233 distinct train problems, and
# 682 test problems on 52 number sets never seen in training (a comparison evaluates 500 of them).
BASE_TASK_KWARGS: dict[str, Any] = {"num_count": 3, "low": 1, "high": 10, "target_low": 1, "target_high": 100,
                                    "test_fraction": 0.2}
BASE_SETTINGS: dict[str, Any] = {
    "steps": 1500,
    "batch_size": 32,
    "lr": 3e-3,
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "seed": 0,
    "max_failures": 2,
    "give_up": 0.0,
    "bluff": False,
    "direct": 0.0,
    "train_problems": 2000,
}
# The trace settings added after the v3 build, at the values that reproduce its traces (the restart search).
TRACE_DEFAULTS: dict[str, Any] = {"give_up": 0.0, "bluff": False, "direct": 0.0}
BASE_EVAL: dict[str, int] = {"eval_problems": 64, "eval_k": 8}


def build_char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of ``chars`` plus pad, EOS and unk.

    Padding is on the left (for generation). Decoding joins characters back without separators.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def load_char_tokenizer(path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`build_char_tokenizer` (``save_pretrained``).

    transformers 5 maps the `qwen2` model type to `Qwen2Tokenizer`, whose byte-level pre-tokenizer drops this
    tokenizer's spaces and newlines, so `AutoTokenizer` must not be used on these folders; this loads the
    `tokenizer.json` as it was saved.
    """
    return PreTrainedTokenizerFast.from_pretrained(str(path), padding_side="left")


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
) -> Qwen2Config:
    """A small `Qwen2Config` sized for ``tokenizer``'s vocabulary."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **size: int) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 model sized by ``size`` (see :func:`tiny_config`) for ``tokenizer``."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tokenizer, **size))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_random(
    *, seed: int = 0, **size: int
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Qwen2 model and the character tokenizer (for tests; nothing downloaded)."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **size)
    model.eval()
    return model, tokenizer


def _write_folder(path: Path, model, tokenizer, meta: dict) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    write_meta(path, meta)


def write_meta(path: Path, meta: dict) -> None:
    """Write ``tokenmdp.json`` (the description of a tiny base model folder)."""
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(path: str | Path) -> dict:
    """The ``tokenmdp.json`` of a model folder; :class:`TokenMDPError` naming the file when missing or invalid."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise TokenMDPError(f"{file} not found: not a tokenmdp tiny model folder (build one with `tokenmdp pretrain`)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenMDPError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def save_atomic(out: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``out``, then rename it to ``out``.

    On any failure (or interrupt) the temporary folder is removed, so ``out`` is either absent, the old folder,
    or complete. An existing ``out`` is replaced only when ``overwrite`` (else :class:`TokenMDPError`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            if not overwrite:
                raise TokenMDPError(f"output folder {out} already exists (pass --overwrite to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def pretrain(
    task: str = "countdown",
    out: str | Path | None = None,
    *,
    steps: int = BASE_SETTINGS["steps"],
    batch_size: int = BASE_SETTINGS["batch_size"],
    lr: float = BASE_SETTINGS["lr"],
    hidden_size: int = BASE_SETTINGS["hidden_size"],
    num_layers: int = BASE_SETTINGS["num_layers"],
    num_heads: int = BASE_SETTINGS["num_heads"],
    seed: int = BASE_SETTINGS["seed"],
    task_kwargs: dict | None = None,
    train_problems: int = BASE_SETTINGS["train_problems"],
    max_failures: int = BASE_SETTINGS["max_failures"],
    give_up: float = BASE_SETTINGS["give_up"],
    bluff: bool = BASE_SETTINGS["bluff"],
    direct: float = BASE_SETTINGS["direct"],
    warmup: int | None = None,
    weight_decay: float = 0.01,
    eval_problems: int = BASE_EVAL["eval_problems"],
    eval_k: int = BASE_EVAL["eval_k"],
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build the char tokenizer and a small Qwen2 model, train it on ``task``'s derivational traces, save to ``out``.

    The folder (written atomically, see :func:`save_atomic`) holds ``model.safetensors``, ``config.json``, the
    tokenizer files and ``tokenmdp.json``: tokenizer kind, task, task kwargs, template, ``max_new_tokens``, the
    pretraining settings and figures, and (``eval_problems > 0``) the held-out figures of
    :func:`tokenmdp.policy.tiny_eval.evaluate_base` on ``eval_problems`` test problems with ``eval_k`` samples each.
    Sets torch's thread count to ``threads`` (default: the idle cores, :func:`~tokenmdp.policy.tiny_train.
    default_threads`). Training problems: the first ``min(train_problems, steps * batch_size)`` of the train split.
    """
    from tokenmdp.tasks import get_task

    out = _check_pretrain_args(task, out, overwrite, steps=steps, batch_size=batch_size, eval_k=eval_k)
    try:
        check_settings(max_failures, give_up, bluff, direct)
    except ValueError as exc:
        raise TokenMDPError(str(exc)) from None
    task_kwargs = {"template": "compact", **(BASE_TASK_KWARGS if task_kwargs is None else task_kwargs)}
    if task_kwargs["template"] != "compact":
        raise TokenMDPError(f"task_kwargs: template must be 'compact' (the traces' format), "
                            f"got {task_kwargs['template']!r}")
    task_obj = get_task(task, **task_kwargs)
    torch.set_num_threads(threads or default_threads())
    started = time.perf_counter()
    problems = task_obj.problems("train", n=min(train_problems, steps * batch_size), seed=seed)
    stream = TraceStream(task_obj, problems, seed=seed, max_failures=max_failures, give_up=give_up,
                         bluff=bluff, direct=direct)
    tokenizer = build_char_tokenizer()
    size = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads}
    model = build_tiny_model(tokenizer, seed=seed, **size)
    warmup = max(1, steps // 20) if warmup is None else warmup
    fit = train_loop(model, tokenizer, stream, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                     weight_decay=weight_decay, progress=progress)
    longest = stream.longest + 1  # characters are tokens; + EOS
    meta: dict[str, Any] = {
        "name": out.name, "tokenizer": "char", "task": task, "task_kwargs": task_kwargs, "template": "compact",
        "max_new_tokens": int(16 * math.ceil((longest + 16) / 16)),
        "trace": {"kind": _trace_kind(give_up, bluff), "max_failures": max_failures, "give_up": give_up,
                  "bluff": bluff, "direct": direct, "longest_completion_tokens": longest},
        "pretrain": {
            "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, **size, "seed": seed,
                         "max_failures": max_failures, "give_up": give_up, "bluff": bluff,
                         "direct": direct, "train_problems": train_problems},
            "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
            "seed": seed, "size": size, "parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "train_problems": len(problems), **fit},
    }
    if eval_problems > 0:
        from tokenmdp.policy.tiny_eval import evaluate_base

        held_out = task_obj.problems("test", n=eval_problems, seed=seed)
        meta["eval"] = evaluate_base(model, tokenizer, task_obj, held_out, k=eval_k,
                                     max_new_tokens=meta["max_new_tokens"], seed=seed, progress=progress)
    meta["pretrain"]["total_s"] = round(time.perf_counter() - started, 1)
    return save_atomic(out, lambda tmp: _write_folder(tmp, model, tokenizer, meta), overwrite=overwrite)


def _trace_kind(give_up: float, bluff: bool) -> str:
    if give_up == 0:
        return "restart-search"
    return "bluff-search" if bluff else "give-up-search"


def _check_pretrain_args(task: str, out: str | Path | None, overwrite: bool, **positive: int) -> Path:
    if task not in TRACE_TASKS:
        raise TokenMDPError(f"task {task!r}: no derivational traces for it; pretrain supports {', '.join(TRACE_TASKS)}")
    if out is None:
        raise TokenMDPError("pretrain needs an output folder (--out)")
    if Path(out).exists() and not overwrite:
        raise TokenMDPError(f"output folder {out} already exists (pass --overwrite to replace it)")
    for name, value in positive.items():
        if value < 1:
            raise TokenMDPError(f"{name} must be >= 1, got {value}")
    return Path(out)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$TOKENMDP_CACHE``, else ``~/.cache/tokenmdp``."""
    root = cache_dir or os.environ.get("TOKENMDP_CACHE") or Path.home() / ".cache" / "tokenmdp"
    return Path(root).expanduser()


def _is_current(path: Path) -> bool:
    """Whether ``path`` holds a base model built with the current defaults."""
    if not (path / META_FILE).is_file():
        return False
    meta = read_meta(path)
    wanted_task = {"template": "compact", **BASE_TASK_KWARGS}
    settings = {**TRACE_DEFAULTS, **meta.get("pretrain", {}).get("settings", {})}  # folders from before give_up
    return meta.get("task_kwargs") == wanted_task and settings == BASE_SETTINGS


def ensure_tiny_base(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The embedded base model's folder ``<cache>/tiny-countdown-v3``: found there, or pretrained there first.

    The default settings are :data:`BASE_SETTINGS` on Countdown with :data:`BASE_TASK_KWARGS`. A cached folder
    built with other settings (an older default) is rebuilt in place (atomically). A folder without
    ``tokenmdp.json`` at that path (not written by :func:`pretrain`) raises :class:`TokenMDPError`. Processes that
    ask at the same time wait on a lock file (``<cache>/.tiny-countdown-v3.lock``) while one of them builds.
    """
    path = cache_root(cache_dir) / BASE_NAME
    if _is_current(path):
        return path
    if path.exists() and not (path / META_FILE).is_file():
        raise TokenMDPError(f"{path} exists but holds no {META_FILE}; remove it so the base model can be rebuilt")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{BASE_NAME}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # no fcntl (Windows): build without the lock
            pass
        if _is_current(path):  # built by another process while this one waited
            return path
        return pretrain("countdown", path, task_kwargs=dict(BASE_TASK_KWARGS), progress=progress, overwrite=True,
                        **BASE_SETTINGS, **BASE_EVAL)


__all__ = [
    "BASE_EVAL", "BASE_NAME", "BASE_SETTINGS", "BASE_TASK_KWARGS", "CHARS", "EOS", "META_FILE", "PAD",
    "build_char_tokenizer", "build_tiny_model", "build_tiny_random", "cache_root", "ensure_tiny_base",
    "load_char_tokenizer", "pretrain", "read_meta", "save_atomic", "tiny_config",
]
