"""Talking to the model: base and adapter loaded once, each line answered as it streams, optionally beside the base.

The answers are the evaluation's: the same prompt ids (the training template), greedy decoding, the same stop rule
and cleanup. The base answer in `--compare` comes from the same loaded model with the adapter switched off, so the
two differ only by the adapter.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from alpaca_qlora.data.formatting import encode_prompt
from alpaca_qlora.data.prompts import PromptTemplate
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation.stop_checks import StopOnMarker
from alpaca_qlora.stop_rule import clean_generation, may_become_stop

INPUT_SEPARATOR = "\t"  # a line "instruction<TAB>input" gives the instruction its context


class AnswerStreamer(BaseStreamer):
    """Writes the cleaned answer as tokens arrive. Text that could still turn into a stop marker (a last line that
    so far reads like the start of "###"), trailing blanks and half-decoded characters wait until the next token
    settles them, so what is written is always a prefix of the final cleaned answer."""

    def __init__(self, tokenizer: Any, stop_markers: Sequence[str], write: Callable[[str], Any]):
        self.tokenizer, self.stop_markers, self.write = tokenizer, tuple(stop_markers), write
        self.ids: list[int] = []
        self.shown = ""
        self.answer = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() pushes the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        self._show(self._settled(self._text()))

    def end(self) -> None:
        self.answer = clean_generation(self._text(), self.stop_markers)
        self._show(self.answer)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _settled(self, text: str) -> str:
        visible = clean_generation(text, self.stop_markers) if text.strip() else ""
        if len(visible) < len(text.strip()):  # a marker was found: the answer is complete
            return visible
        visible = text.lstrip().rstrip("\ufffd")
        settled, _, last_line = visible.rpartition("\n")
        return (settled if may_become_stop(last_line, self.stop_markers) else visible).rstrip()

    def _show(self, visible: str) -> None:
        if visible.startswith(self.shown) and len(visible) > len(self.shown):
            self.write(visible[len(self.shown):])
            self.shown = visible


@dataclass
class ChatSession:
    """A model loaded once (a PeftModel when an adapter is attached) and how to prompt it."""

    model: Any
    tokenizer: Any
    template: PromptTemplate
    max_new_tokens: int

    @property
    def has_adapter(self) -> bool:
        return callable(getattr(self.model, "disable_adapter", None))

    def _adapter_off(self) -> contextlib.AbstractContextManager:
        if not self.has_adapter:
            raise PipelineError("--compare needs an adapter to switch off: run `dvc repro train` first.")
        return self.model.disable_adapter()

    @torch.inference_mode()
    def answer(self, instruction: str, input_text: str = "", *, adapter: bool = True,
               write: Callable[[str], Any] = lambda text: None) -> str:
        """The greedy answer, written piece by piece through `write` as it is generated; returns it whole."""
        ids = encode_prompt(self.tokenizer, self.template.render(instruction, input_text))
        input_ids = torch.tensor([ids], device=next(self.model.parameters()).device)
        streamer = AnswerStreamer(self.tokenizer, self.template.stop_markers, write)
        with contextlib.nullcontext() if adapter else self._adapter_off():
            self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=self.max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([StopOnMarker(self.tokenizer, len(ids),
                                                                     self.template.stop_markers)]),
            )
        return streamer.answer


def questions(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(instruction, input) per non-blank line; a tab separates an optional input."""
    for line in lines:
        instruction, _, input_text = line.rstrip("\r\n").partition(INPUT_SEPARATOR)
        if instruction.strip():
            yield instruction.strip(), input_text.strip()


def chat(session: ChatSession, lines: Iterable[str], out: TextIO, *, compare: bool,
         prompt: Callable[[], Any] = lambda: None) -> None:
    """Answer every line; with `compare`, the base model's answer first, then the fine-tuned one."""
    if compare and not session.has_adapter:
        raise PipelineError("--compare needs an adapter to switch off: run `dvc repro train` first.")
    labelled = [("base", False), ("fine-tuned", True)] if compare else [("", True)]
    width = max(len(label) for label, _ in labelled)
    prompt()
    for instruction, input_text in questions(lines):
        for label, adapter in labelled:
            if label:
                out.write(f"{label + ':':<{width + 1}} ")
            session.answer(instruction, input_text, adapter=adapter, write=lambda text: (out.write(text), out.flush()))
            out.write("\n")
        out.flush()
        prompt()
