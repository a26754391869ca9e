"""The graphed loop (static KV cache, the decoding step a CUDA graph on GPU, run eagerly here): where it refuses,
and its stop checks a chunk behind."""
from __future__ import annotations

import pytest

from alpaca_qlora.errors import PipelineError
from support.generation import PROMPTS, TEMPLATE, Calls, run


def test_graphed_refuses_batches_beyond_the_sliding_window(tiny_lora):
    """A static cache keeps every key in view: past a sliding window it would attend where the model does not."""
    model, tokenizer = tiny_lora
    config = model.get_base_model().config
    original, config.sliding_window = getattr(config, "sliding_window", None), 40
    try:
        with pytest.raises(PipelineError, match="sliding window"):
            run(model, tokenizer, "graphed", max_new_tokens=30, prompts=PROMPTS[:2])
    finally:
        config.sliding_window = original


@pytest.mark.parametrize("check_every", [1, 3, 64])
def test_graphed_stop_checks_a_chunk_behind_keep_plain_tokens(embedded, check_every):
    """The host checks each chunk of steps while the next decodes, so the loop runs past the last stop; the
    rows keep exactly plain's tokens at every chunk size, and a recorder sees every phase (prefill, capture, decode,
    the host's checks)."""
    from alpaca_qlora.data.formatting import encode_prompt
    from alpaca_qlora.generation.batching import left_pad, split_generated
    from alpaca_qlora.generation.graphed import graphed_generate
    from alpaca_qlora.generation.stop_checks import MarkerCheck

    model, tokenizer, _ = embedded
    plain = run(model, tokenizer, "plain", max_new_tokens=20)
    input_ids, attention_mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    recorder = Calls()
    rows = graphed_generate(model, input_ids, attention_mask, max_new_tokens=20, eos_token_id=tokenizer.eos_token_id,
                            marker_check=MarkerCheck(tokenizer, TEMPLATE.stop_markers), check_every=check_every,
                            recorder=recorder)
    texts = [tokenizer.decode(split_generated(r, tokenizer.eos_token_id, tokenizer.pad_token_id)[0],
                              skip_special_tokens=True) for r in rows]
    assert texts == [g.raw for g in plain]
    assert [call for call in recorder.calls if call != "host_work"] == ["begin", "prefill", "capture", "decode"]
    assert "host_work" in recorder.calls
