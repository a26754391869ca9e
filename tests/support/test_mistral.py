"""The test and bench support's Mistral: the rebuilt tokenizer gives sentencepiece's and mistral-common's ids, and
the random-init model reloads, runs and is reproducible from its seed."""
from __future__ import annotations

import json

import pytest
import sentencepiece
import torch

from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from support.mistral import build_tiny_mistral, mistral_tokenizer, mistral_tokenizer_model_path

# Read off the sentencepiece model itself: <s>=1, "▁Hello"=22557, "▁world"=1526.
HELLO_WORLD_IDS = [1, 22557, 1526]
TRICKY_TEXTS = [
    "Hello world",
    "line one\nline two\n\n",
    "### Response:\n",
    "\n### Instruction:\nName a colour.\n\n### Response:\nBlue",
    "Café naïve 東京 🙂",
    " leading space",
    "   three leading spaces",
    "a  b   c",
    "trailing space ",
    "\tindented\n    code",
    "digits 1234567.89 and 3+3=6",
]


@pytest.fixture(scope="module")
def sentencepiece_processor() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_model_path()))


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


# --- Mistral tokenizer --------------------------------------------------------------------------------------------


def test_hello_world_gets_mistral_7b_ids(tokenizer, sentencepiece_processor):
    assert [sentencepiece_processor.bos_id(), *sentencepiece_processor.encode("Hello world")] == HELLO_WORLD_IDS
    assert tokenizer("Hello world")["input_ids"] == HELLO_WORLD_IDS


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_ids_equal_sentencepiece_before_and_after_saving(text, tokenizer, tiny_mistral_dir, sentencepiece_processor):
    expected = [1, *sentencepiece_processor.encode(text)]
    assert tokenizer(text)["input_ids"] == expected
    assert load_tokenizer(str(tiny_mistral_dir))(text)["input_ids"] == expected
    assert tokenizer.decode(expected, skip_special_tokens=True) == text


def test_special_tokens_and_no_automatic_eos(tokenizer):
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert len(tokenizer) == 32000
    ids = tokenizer("An answer.")["input_ids"]
    assert ids[0] == 1 and 2 not in ids
    assert tokenizer("An answer.", add_special_tokens=False)["input_ids"] == ids[1:]


def test_chat_template_gives_mistral_commons_instruct_ids(tokenizer):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    turns = [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "Four."), ("user", "And 3+3?")]
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[role](content=content) for role, content in turns])
    expected = MistralTokenizer.v1().encode_chat_completion(request).tokens
    rendered = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in turns],
                                             tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected


# --- tiny Mistral -------------------------------------------------------------------------------------------------


def test_tiny_mistral_reloads_and_runs(tiny_mistral_dir):
    config = json.loads((tiny_mistral_dir / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["vocab_size"] == 32000 and config["num_hidden_layers"] == 2
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    tokenizer = load_tokenizer(str(tiny_mistral_dir))
    batch = tokenizer(["Hello world", "A longer line of text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 32000)
    assert torch.isfinite(logits).all()


def test_tiny_mistral_is_reproducible_from_its_seed(tmp_path):
    def first_weights(seed: int) -> torch.Tensor:
        from safetensors.torch import load_file

        out = build_tiny_mistral(tmp_path / f"seed{seed}-{len(list(tmp_path.iterdir()))}", num_hidden_layers=1,
                                 seed=seed)
        return load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]

    assert torch.equal(first_weights(0), first_weights(0))
    assert not torch.equal(first_weights(0), first_weights(1))
