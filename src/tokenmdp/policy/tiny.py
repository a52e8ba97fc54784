"""Tiny models built from a config: a character-level tokenizer and a small Qwen2 model.

Both are built from scratch with no hub: the tokenizer with the `tokenizers` library (saved as standard Hugging
Face tokenizer files) and the model from a `transformers.Qwen2Config`. Tests use :func:`build_tiny_random` for a
random model; the embedded base model's factory (:mod:`tokenmdp.base`) pretrains one on search traces.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD = "<pad>"
EOS = "<|endoftext|>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


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


__all__ = ["CHARS", "EOS", "PAD", "SPECIAL_TOKENS", "UNK", "build_char_tokenizer", "build_tiny_model",
           "build_tiny_random", "load_char_tokenizer", "tiny_config"]
