"""The embedded SmolLM2-135M-Instruct end to end: greedy chat replies equal transformers' on the same GGUF."""

from __future__ import annotations

import pytest
torch = pytest.importorskip("torch")  # the CI stage on jax 0.11.2 has no torch

import jaxinfer
from jaxinfer.checkpoints.gguf_file import default_gguf_path

try:
    GGUF = default_gguf_path()
except ValueError as e:
    pytest.skip(str(e), allow_module_level=True)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Explain photosynthesis in one sentence."}],
]


@pytest.fixture(scope="module")
def models():
    import transformers

    ours = jaxinfer.load_model("default", dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    return ours, theirs


def test_greedy_chat_replies_equal_transformers(models):
    ours, theirs = models
    prompts = [
        ours.tokenizer.encode(ours.tokenizer.apply_chat_template(chat), add_special_tokens=False) for chat in CHATS
    ]
    outs = jaxinfer.generate(ours, prompts, max_new_tokens=32, sampling=jaxinfer.SamplingParams(temperature=0.0))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = theirs.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=ours.cfg.eos_token_ids[0],
                pad_token_id=ours.cfg.eos_token_ids[0],
            )[0, len(prompt):].tolist()
        assert out.tokens == ref, (ours.tokenizer.decode(out.tokens), ours.tokenizer.decode(ref))
        assert out.text == ours.tokenizer.decode(ref) and out.text.strip()
    assert "Paris" in outs[0].text
