import pytest

from alpaca_qlora.prompts import ALPACA, INSTRUCTION_CONTEXT, get_template

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n### Input:\nA long text."
    "\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a colour.\n\n### Response:\n"
)


def test_alpaca_template_bytes_match_alpaca_lora_unsloth_litgpt():
    assert ALPACA.render("Summarize.", "A long text.").encode() == ALPACA_WITH_INPUT.encode()
    assert ALPACA.render("Name a colour.", "").encode() == ALPACA_WITHOUT_INPUT.encode()


def test_whitespace_only_input_uses_the_no_input_variant():
    assert ALPACA.render("Name a colour.", "  \n") == ALPACA_WITHOUT_INPUT


def test_instruction_context_layout():
    assert INSTRUCTION_CONTEXT.render("Q?", "ctx") == "### Instruction:\nQ?\n\n### Context:\nctx\n\n### Response:\n"
    assert INSTRUCTION_CONTEXT.render("Q?") == "### Instruction:\nQ?\n\n### Response:\n"


def test_braces_in_user_text_are_kept_verbatim():
    assert "{input}" in ALPACA.render("Explain {input} in str.format", "x")


def test_unknown_template_names_the_choices():
    with pytest.raises(ValueError, match="alpaca, instruction_context"):
        get_template("chatml")
