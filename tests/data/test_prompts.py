import pytest

from alpaca_qlora.data.formatting import encode_prompt, special_prefix
from alpaca_qlora.data.prompts import ALPACA, INSTRUCTION_CONTEXT, get_template
from alpaca_qlora.models.loading import load_tokenizer

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


@pytest.mark.parametrize("template", [ALPACA, INSTRUCTION_CONTEXT], ids=lambda t: t.name)
@pytest.mark.parametrize("message", [
    {"role": "user", "content": "Name {a} noble gas."},
    {"role": "user", "content": "Summarize.", "input": "A {b} text\n### with a header"},
    {"role": "user", "content": "No context.", "input": "   "},
])
def test_chat_template_renders_a_message_into_the_training_prompt_ids(template, message, tiny_mistral_dir):
    tokenizer = load_tokenizer(str(tiny_mistral_dir))
    tokenizer.chat_template = template.chat_template(tokenizer.decode(special_prefix(tokenizer)))
    ids = tokenizer.apply_chat_template([message], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == encode_prompt(tokenizer, template.render(message["content"], message.get("input", "")))
    assert ids["input_ids"][0] == tokenizer.bos_token_id


def test_chat_template_refuses_a_conversation_not_ending_with_the_user():
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(Exception, match="last message must be the user"):
        render_jinja_template([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                              chat_template=ALPACA.chat_template())
