"""Talking to the model: loaded once, answers streamed, base beside fine-tuned, the evaluation's answers."""
from __future__ import annotations

import io

import pytest
import torch
import yaml

from alpaca_qlora import infer
from alpaca_qlora.chat import AnswerStreamer, questions
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation import generate
from alpaca_qlora.models import inference
from alpaca_qlora.stop_rule import clean_generation

QUESTIONS = ["What is the capital of France?", "Name a noble gas.\tAnswer in one word."]


@pytest.fixture(scope="module")
def project(adapter_project):
    return adapter_project


def run_chat(project, monkeypatch, capsys, *flags: str) -> list[str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(QUESTIONS) + "\n\n"))
    infer.main(["--chat", "--params", str(project / "params.yaml"), "--adapter", str(project / "adapter"), *flags])
    return capsys.readouterr().out.splitlines()


def evaluation_answers(project, *, adapter: bool) -> list[str]:
    params = yaml.safe_load((project / "params.yaml").read_text())
    loaded = inference.load_for_inference(params["model"]["name"], "none",
                                          adapter_dir=project / "adapter" if adapter else None)
    prompts = [ALPACA.render(*(list(pair) + [""])[:2]) for pair in questions(QUESTIONS)]
    generations, _ = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12, batch_size=1,
                              stop_markers=ALPACA.stop_markers, progress=False)
    return [clean_generation(generation.raw, ALPACA.stop_markers) for generation in generations]


def test_compare_answers_each_line_with_base_then_fine_tuned_loading_once(project, monkeypatch, capsys):
    loads = []
    real_load = inference.load_for_inference
    monkeypatch.setattr(infer, "load_for_inference", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    lines = run_chat(project, monkeypatch, capsys, "--compare")
    assert len(loads) == 1
    assert len(lines) == 2 * len(QUESTIONS)
    base = [line.removeprefix("base:       ") for line in lines[0::2]]
    tuned = [line.removeprefix("fine-tuned: ") for line in lines[1::2]]
    assert all(line.startswith("base:") for line in lines[0::2])
    assert all(line.startswith("fine-tuned:") for line in lines[1::2])
    # the same answers the evaluation gives: adapter switched off for base, on for fine-tuned
    assert base == evaluation_answers(project, adapter=False)
    assert tuned == evaluation_answers(project, adapter=True)
    assert base != tuned


def test_chat_without_compare_prints_only_the_fine_tuned_answer(project, monkeypatch, capsys):
    lines = run_chat(project, monkeypatch, capsys)
    assert lines == evaluation_answers(project, adapter=True)


def test_compare_without_an_adapter_is_refused(project, monkeypatch, capsys):
    with pytest.raises(PipelineError, match="run `dvc repro train` first"):
        run_chat(project, monkeypatch, capsys, "--compare", "--adapter", str(project / "missing"))


class SpellingTokenizer:
    """Decodes ids as characters, so a test can stream any text one character at a time."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("raw", [
    "Paris.\n\n### Instruction:\nName another city.",
    "  Paris is the capital.\n  ### Response: more",
    "It is # one\n## two",
    "Trailing blanks   \n\n",
])
def test_streamed_pieces_join_into_the_cleaned_answer_and_never_show_a_marker(raw):
    pieces: list[str] = []
    streamer = AnswerStreamer(SpellingTokenizer(), ALPACA.stop_markers, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() pushes first
    for char in raw:
        streamer.put(torch.tensor([ord(char)]))
    streamer.end()
    assert "".join(pieces) == clean_generation(raw, ALPACA.stop_markers) == streamer.answer
    assert len(pieces) > 1  # streamed, not written at the end
    assert not any("###" in piece for piece in pieces)
