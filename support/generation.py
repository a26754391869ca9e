"""What the generation tests share: Alpaca prompts, a generate() runner that checks which method ran, and bnb's
CPU 4-bit layers kept on the path CUDA takes."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.generation import Recorder, generate

TEMPLATE = get_template("alpaca")
QUESTIONS = ["What is the capital of France?", "Name the chemical symbol of sodium.", "Write a haiku about the sea.",
             "Classify 'I love it' as positive or negative.", "List three primary colors.", "What is 2+2?"]
PROMPTS = [TEMPLATE.render(question, "") for question in QUESTIONS]


def bnb_default_path(model) -> None:
    """On AVX512-BF16 CPUs bnb repacks 4-bit weights for a bf16 kernel at the first eval forward; keep it on the
    path CUDA takes for batches (dequantize + F.linear) so the comparison is the GPU's."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def run(model, tokenizer, method, markers=TEMPLATE.stop_markers, max_new_tokens=30, batch_size=6, prompts=PROMPTS):
    generations, stats = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  stop_markers=markers, progress=False, method=method)
    assert stats["generation"] == method
    return generations


class Calls(Recorder):
    """A recorder that writes down every call a decoding loop makes of it, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self) -> None:
        self.calls.append("begin")

    def mark(self, phase: str) -> None:
        self.calls.append(phase)

    @contextlib.contextmanager
    def host_work(self) -> Iterator[None]:
        self.calls.append("host_work")
        yield
