"""Answer instructions with the fine-tuned model, talk to it, or export base + adapter merged into one fp16 model.

    python -m alpaca_qlora.infer "Name the chemical symbol of sodium." [--input TEXT]
    python -m alpaca_qlora.infer --chat [--compare]     # one instruction per line (TAB, then an optional input)
    python -m alpaca_qlora.infer --merge models/merged

The base model, quantization, template and token limit come from params.yaml, as the pipeline used them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from alpaca_qlora import io
from alpaca_qlora.chat import ChatSession, chat
from alpaca_qlora.config import load_params
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.generation import generate
from alpaca_qlora.models.inference import check_adapter_matches, check_adapter_weights, load_for_inference
from alpaca_qlora.models.loading import load_model, load_tokenizer, resolve_model_source
from alpaca_qlora.models.quantization import QuantizationPlan
from alpaca_qlora.stage import run_command
from alpaca_qlora.stop_rule import clean_generation

log = logging.getLogger("infer")
ON_INTERRUPT = "nothing was written (--merge moves its folder into place only when it is complete)"


def merge_adapter(model_name: str, adapter_dir: Path, out_dir: Path) -> None:
    """Merged fp16 weights: the adapter folded into an unquantized base (merging into 4-bit would round it away)."""
    from peft import PeftModel

    source = resolve_model_source(model_name)
    check_adapter_matches(adapter_dir, source, model_name)
    check_adapter_weights(adapter_dir)
    plan = QuantizationPlan(quantized=False, reason="merging needs full-precision weights",
                            compute_dtype=torch.float16)
    model = PeftModel.from_pretrained(load_model(source, plan, device="cpu"), str(adapter_dir))
    merged = model.merge_and_unload()
    with io.atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        load_tokenizer(source).save_pretrained(str(tmp))
    log.info("merged fp16 model written to %s", out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Answer an instruction with base model + adapter.")
    parser.add_argument("instruction", nargs="?", help="the instruction to answer")
    parser.add_argument("--input", default="", help="optional context for the instruction")
    parser.add_argument("--adapter", type=Path, default=Path("models/adapter"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base-only", action="store_true", help="answer without the adapter")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--merge", type=Path, metavar="OUT", help="write a merged fp16 model to OUT and exit")
    parser.add_argument("--chat", action="store_true", help="load once, then answer each line of standard input")
    parser.add_argument("--compare", action="store_true", help="with --chat: the base answer (adapter off) first")
    arguments = parser.parse_args(argv)
    params = load_params(arguments.params)
    if arguments.merge:
        merge_adapter(params.model.name, arguments.adapter, arguments.merge)
        return
    if not (arguments.instruction or "").strip() and not arguments.chat:  # blank is no instruction either
        parser.error("give an instruction to answer (or --chat, or --merge OUT)")
    if arguments.compare and (arguments.base_only or not arguments.chat):
        parser.error("--compare goes with --chat and an adapter (not --base-only)")
    template = get_template(params.data.template)
    loaded = load_for_inference(params.model.name, params.model.quantization,
                                adapter_dir=None if arguments.base_only else arguments.adapter)
    # auto sizes the limit by eval references; a lone instruction has none, so it gets the cap (EOS still stops it)
    configured = params.eval.max_new_tokens
    limit = arguments.max_new_tokens or (params.eval.max_new_tokens_cap if configured == "auto" else configured)
    if arguments.chat:
        session = ChatSession(loaded.model, loaded.tokenizer, template, limit)
        interactive = sys.stdin.isatty()
        chat(session, sys.stdin, sys.stdout, compare=arguments.compare,
             prompt=lambda: interactive and (sys.stderr.write("> "), sys.stderr.flush()))
        return
    generations, _ = generate(
        loaded.model, loaded.tokenizer, [template.render(arguments.instruction, arguments.input)],
        max_new_tokens=limit, batch_size=1,
        stop_markers=template.stop_markers, progress=False,
    )
    sys.stdout.write(clean_generation(generations[0].raw, template.stop_markers) + "\n")


if __name__ == "__main__":
    run_command(main, name="infer", on_interrupt=ON_INTERRUPT)
