"""The adapter as a product: a folder any PEFT user can load onto its base and prompt as training did.

A chat endpoint given messages (vLLM, `pipeline("text-generation")`, TGI) prompts with the tokenizer's chat
template. The base tokenizer's template (Mistral's `[INST]`, SmolLM2's ChatML) is a format the adapter never saw,
so the saved tokenizer carries the training prompt as its template instead, and `prompt_template.json` holds it as
plain text for tools that take no Jinja.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from alpaca_qlora.config import EMBEDDED_MODEL, EMBEDDED_MODEL_ORIGIN
from alpaca_qlora.data.formatting import special_prefix
from alpaca_qlora.data.prompts import PromptTemplate

PROMPT_TEMPLATE_FILE = "prompt_template.json"
CARD_FILE = "README.md"
# Base models whose license the card can name; any other gets "other", and the card says to check.
KNOWN_LICENSES = {EMBEDDED_MODEL_ORIGIN: "apache-2.0", "mistralai/Mistral-7B-Instruct-v0.2": "apache-2.0"}
EVALUATED_METRICS = ("exact_match", "exact_match_strict", "f1", "f1_all", "key_fact_recall", "stop_rate",
                     "verbosity")


def portable_base_model(model_name: str) -> str:
    """The base model as a tool outside this project names it: the embedded model's hub origin, else as given."""
    return EMBEDDED_MODEL_ORIGIN if model_name == EMBEDDED_MODEL else model_name


def training_chat_template(template: PromptTemplate, tokenizer: Any) -> str:
    """The training prompt as a chat template; it writes the BOS text itself, which apply_chat_template never adds."""
    return template.chat_template(tokenizer.decode(special_prefix(tokenizer)))


def _front_matter(base_model: str, data: dict[str, Any]) -> list[str]:
    lines = ["---", f"base_model: {base_model}"]
    if data.get("source") == "hub":
        lines += ["datasets:", f"- {data['hub_id']}  # revision {data.get('resolved_commit') or data.get('revision')}"]
    lines += [
        "library_name: peft",
        f"license: {KNOWN_LICENSES.get(base_model, 'other')}",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {tag}" for tag in ("lora", "qlora", "peft", "alpaca", "instruction-tuning")],
        "---",
    ]
    return lines


def describe_data(data: dict[str, Any]) -> str:
    if data.get("source") == "hub":
        commit = data.get("resolved_commit") or data.get("revision")
        return f"Hugging Face dataset `{data['hub_id']}` at revision `{commit}` (asked for `{data.get('revision')}`)."
    if data.get("source") == "bundled":
        return (f"the project's bundled Alpaca-format rows (version {data.get('bundled_version')}), not a hub "
                "dataset.")
    return f"a local Alpaca-format file (`{data.get('path')}`), not a hub dataset."


def load_snippet(base_model: str, example: str) -> list[str]:
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'adapter = "path/to/this/folder"',
        f'model = AutoModelForCausalLM.from_pretrained("{base_model}")',
        "model = PeftModel.from_pretrained(model, adapter)",
        "tokenizer = AutoTokenizer.from_pretrained(adapter)  # its chat template is the training prompt",
        f'messages = [{{"role": "user", "content": {example!r}, "input": ""}}]  # "input": optional context',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
    ]


def render_model_card(*, model_name: str, template: PromptTemplate, params: dict[str, Any],
                      metrics: dict[str, Any], data: dict[str, Any], training_data: dict[str, Any]) -> str:
    """The adapter's README with Hub metadata: what it is, how it was made, and how to load and prompt it.

    `data` is the fetch stage's description of the source (metrics/data.json), `training_data` the train file's.
    """
    base_model = portable_base_model(model_name)
    origin = (f" The pipeline's default base model `{EMBEDDED_MODEL}` is the Q4_1 GGUF of `{EMBEDDED_MODEL_ORIGIN}`, "
              "converted to safetensors; load the adapter onto the hub model as below."
              if model_name == EMBEDDED_MODEL else "")
    lines = [
        *_front_matter(base_model, data),
        "",
        f"# LoRA adapter for {base_model}",
        "",
        "Trained by the alpaca-qlora DVC pipeline (`dvc repro`): instruction tuning with the loss on response "
        f"tokens only, on {describe_data(data)}{origin}",
        "",
        "## Prompt format",
        "",
        f"The `{template.name}` template, exactly as in training. The tokenizer's chat template renders the last "
        "user message into it (`content` is the instruction, an optional `input` key the context), and "
        f"`{PROMPT_TEMPLATE_FILE}` holds the same text for tools without chat templates. With input:",
        "",
        "```text",
        template.with_input,
        "```",
        "",
        "Without input:",
        "",
        "```text",
        template.without_input,
        "```",
        "",
        "## Use",
        "",
        *load_snippet(base_model, "Name the chemical symbol of sodium."),
        "",
        f"In training the base was loaded {'4-bit NF4' if metrics.get('quantized') else 'unquantized'}. In this "
        'project: `python -m alpaca_qlora.infer "Name the chemical symbol of sodium."`.',
        "",
        "## Data",
        "",
        *[f"- {key}: {value}" for key, value in sorted(training_data.items())],
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(params, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Training metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in sorted(metrics.items())],
        "",
    ]
    return "\n".join(lines)


def evaluation_section(compare: dict[str, Any]) -> str:
    """The eval table of metrics/compare.json: fine-tuned minus base, with each delta's paired bootstrap interval."""
    def cell(values: dict[str, Any], metric: str) -> str:
        delta = values.get(f"{metric}_delta")
        if delta is None:
            return "n/a"
        low, high = values.get(f"{metric}_delta_ci_low"), values.get(f"{metric}_delta_ci_high")
        return f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else f"{delta:+.4f}"

    groups = {"overall": compare["overall"], **compare.get("by_task_type", {})}
    metrics = [metric for metric in EVALUATED_METRICS if f"{metric}_delta" in compare["overall"]]
    lines = [
        "## Evaluation",
        "",
        "Fine-tuned minus base on the held-out eval split, greedy decoding; brackets: the paired bootstrap "
        "interval (`reports/compare.md` says how many resamples and the confidence).",
        "",
        "| rows | " + " | ".join(metrics) + " |",
        "| --- | " + " | ".join("---" for _ in metrics) + " |",
        *[f"| {name} (n={values.get('n_rows')}) | " + " | ".join(cell(values, metric) for metric in metrics) + " |"
          for name, values in groups.items()],
        "",
    ]
    p_value = compare["overall"].get("exact_match_mcnemar_p")
    if p_value is not None:
        lines += [f"Exact match, McNemar's test: p = {p_value}.", ""]
    return "\n".join(lines)


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, model_card: str, *, model_name: str,
                 template: PromptTemplate, state_dict: dict[str, Any] | None = None) -> None:
    """Adapter weights and config, the tokenizer with the training prompt as its chat template, the template as
    JSON and the card, swapped into place only when complete.

    adapter_config.json names the base as a user resolves it (a hub id, not this machine's cache directory), and its
    target modules sorted: PEFT keeps them as a set and writes them in hash order, which differs between runs and
    would change the adapter's DVC hash with identical weights.
    """
    targets: dict[str, set[str]] = {}
    original_template = tokenizer.chat_template
    try:
        for name, config in model.peft_config.items():
            config.base_model_name_or_path = portable_base_model(model_name)
            if isinstance(config.target_modules, set):
                targets[name], config.target_modules = config.target_modules, sorted(config.target_modules)
        tokenizer.chat_template = training_chat_template(template, tokenizer)
        with io.atomic_dir(out_dir) as tmp:
            # The vocabulary is never resized, so no embedding copy: PEFT's "auto" would ask the hub to find out.
            model.save_pretrained(str(tmp), save_embedding_layers=False,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(str(tmp))
            (tmp / PROMPT_TEMPLATE_FILE).write_text(template.as_json(), encoding="utf-8")
            (tmp / CARD_FILE).write_text(model_card, encoding="utf-8")
    finally:
        tokenizer.chat_template = original_template
        for name, modules in targets.items():
            model.peft_config[name].target_modules = modules


def package_release(adapter_dir: Path, release_dir: Path, compare: dict[str, Any]) -> None:
    """The adapter's files with the card completed by the evaluation, which exists only after train."""
    card = (adapter_dir / CARD_FILE).read_text(encoding="utf-8").rstrip("\n") + "\n\n" + evaluation_section(compare)
    with io.atomic_dir(release_dir) as tmp:
        for path in sorted(adapter_dir.iterdir()):
            if path.is_file() and path.name != CARD_FILE:
                shutil.copy2(path, tmp / path.name)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
