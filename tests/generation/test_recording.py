"""The recorder a bench passes to generate(): our own loops tell it where each batch's phases end, plain (which is
transformers' generate()) tells it nothing, and recording never changes an answer."""
from __future__ import annotations

import pytest

from alpaca_qlora.generation import Recorder, generate
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from support.generation import PROMPTS, Calls


@pytest.fixture(scope="module")
def tiny(tiny_mistral_dir):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    return model, load_tokenizer(str(tiny_mistral_dir), padding_side="left")


def answers(tiny, method: str, **recorder: Recorder):
    model, tokenizer = tiny
    generations, _ = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=6, batch_size=2, stop_markers=(),
                              progress=False, method=method, **recorder)
    return generations


@pytest.mark.parametrize(("method", "per_batch"), [
    ("fast", ["begin", "prefill", "decode"]),
    ("graphed", ["begin", "prefill", "capture", "host_work", "decode"]),  # one chunk of 6 steps, checked at the end
    ("plain", []),
], ids=["fast", "graphed", "plain"])
def test_a_recorder_sees_each_batchs_phases_in_order_and_changes_no_answer(tiny, method, per_batch):
    calls = Calls()
    assert answers(tiny, method, recorder=calls) == answers(tiny, method)
    assert calls.calls == per_batch * 2  # three prompts in batches of two
