"""The prompt templates: defined once, used by format (training), evaluate and inference alike.

The Alpaca strings are byte-exact to the ones alpaca-lora, Unsloth and LitGPT use, so an adapter trained here
answers prompts built by those tools the same way (a single changed byte shifts the tokens the model sees).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    with_input: str
    without_input: str
    # Generation stops when the model starts a new section header: it has finished its answer.
    stop_markers: tuple[str, ...] = ("### ",)

    def render(self, instruction: str, input_text: str = "") -> str:
        """The prompt up to and including the response header; the response follows it directly."""
        if input_text.strip():
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.without_input.format(instruction=instruction)

    def chat_template(self, prefix: str = "") -> str:
        """A Jinja chat template that renders the last user message into this prompt, so a chat endpoint given
        messages (vLLM, `pipeline("text-generation")`, `apply_chat_template`) prompts as training did. The message's
        `content` is the instruction, an optional `input` key the context; `prefix` is the text of the tokens the
        tokenizer puts first (BOS), which apply_chat_template does not add by itself."""
        def literal(text: str) -> str:
            return "{% raw %}" + text + "{% endraw %}"

        def body(form: str) -> str:
            pieces = []
            for chunk in form.replace("{input}", "\0input\0").replace("{instruction}", "\0instruction\0").split("\0"):
                if chunk in ("instruction", "input"):
                    pieces.append("{{ message['content'] }}" if chunk == "instruction" else "{{ message['input'] }}")
                elif chunk:
                    pieces.append(literal(chunk))
            return "".join(pieces)

        return (
            "{%- set message = messages[-1] -%}"
            "{%- if message['role'] != 'user' -%}"
            "{{ raise_exception('the " + self.name + " prompt answers one user message; the last message must be "
            "the user\\'s') }}{%- endif -%}"
            + literal(prefix)
            + "{%- if message.get('input') and message['input'].strip() -%}" + body(self.with_input)
            + "{%- else -%}" + body(self.without_input) + "{%- endif -%}"
        )

    def as_json(self) -> str:
        """The template as data, saved next to an adapter so any tool can prompt as training did."""
        return json.dumps(asdict(self), indent=2) + "\n"


ALPACA = PromptTemplate(
    name="alpaca",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    without_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

# Seed 000's layout: Instruction / Context / Response sections, no preamble.
INSTRUCTION_CONTEXT = PromptTemplate(
    name="instruction_context",
    with_input="### Instruction:\n{instruction}\n\n### Context:\n{input}\n\n### Response:\n",
    without_input="### Instruction:\n{instruction}\n\n### Response:\n",
)

TEMPLATES: dict[str, PromptTemplate] = {template.name: template for template in (ALPACA, INSTRUCTION_CONTEXT)}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; choose one of: {', '.join(TEMPLATES)}.") from None
