"""The model, prompts and variants the evaluation benches (eval_bench, sure_model) generate with: a 4-bit model with
a non-zero LoRA adapter, Alpaca-formatted prompts, and each variant's preparation of the same model object.

Variants, in this order on the same model object:
- plain:               generation.generate(method="plain"): model.generate(), 4-bit bnb layers (the baseline);
- graphed:             method="graphed": the same 4-bit layers, static KV cache, decoding step in a CUDA graph,
                       attention through sdpa with enable_gqa (alpaca_qlora/generation/attention.py);
- graphed_folded:      graphed with LoRA folded (fold_lora_for_generation): auto's path on a card too small for
                       the dequantized weights;
- fast:                the base dequantized once (dequantize_for_generation) + own greedy loop dropping finished
                       rows (method="fast");
- graphed_dequantized: the dequantized base with method="graphed", PEFT's LoRA;
- graphed_grouped:     graphed_dequantized with LoRA grouped by input (group_lora_for_generation): PEFT's arithmetic
                       once for q/k/v and once for gate/up, alone for o and down;
- auto:                what the evaluate stage runs by default (prepare_for_generation with eval.generation auto: on
                       a large card graphed on the dequantized base); `eval_speedup` is this variant's when
                       measured, else graphed_dequantized's, else graphed's;
- auto_folded:         auto with eval.fold_lora true: LoRA folded beside the weights in bf16 (explicit option);
- merged_bf16:         LoRA merged into the dequantized weights, method="graphed" (explicit option: changes
                       precision).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.generation import (
    dequantize_for_generation,
    fold_lora_for_generation,
    group_lora_for_generation,
    merge_lora_for_generation,
    prepare_for_generation,
    resolve_generation_method,
)
from alpaca_qlora.generation.lora_groups import GroupedLoraMember
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import attach_lora
from bench.train_variants import profile_lora

log = logging.getLogger("eval_bench")
# variant: (generation method, base weights, LoRA); the weights change in place, only forward: 4-bit -> dequantized,
# PEFT LoRA -> folded, grouped or merged. auto and auto_folded are the evaluate stage's own preparation
# (generation.prepare_for_generation: on CUDA LoRA grouped by input where the base is dequantized), with eval.fold_lora
# false and true.
VARIANTS = {"plain": ("plain", "nf4", "peft"), "graphed": ("graphed", "nf4", "peft"),
            "graphed_folded": ("graphed", "nf4", "folded"), "fast": ("fast", "dequantized", "peft"),
            "graphed_dequantized": ("graphed", "dequantized", "peft"),
            "graphed_grouped": ("graphed", "dequantized", "grouped"), "auto": ("auto", None, None),
            "auto_folded": ("auto", None, "folded"),
            "merged_bf16": ("graphed", "dequantized", "merged")}

INSTRUCTIONS = [
    ("What is the capital of France?", ""),
    ("Give three tips for staying healthy.", ""),
    ("Classify the sentiment of the following review as positive or negative.",
     "The battery lasts all day and the screen is gorgeous, but the speakers are a little quiet."),
    ("Summarize the paragraph in one sentence.",
     "The Industrial Revolution began in Great Britain in the late 18th century and spread to Europe and North "
     "America. It marked a shift from hand production to machines, new chemical manufacturing and iron "
     "production processes, the increasing use of steam power and the rise of the factory system."),
    ("Translate the following sentence into Spanish.", "The weather is beautiful today, let's go for a walk."),
    ("Write a short poem about the ocean at night.", ""),
    ("Explain the difference between a virus and a bacterium.", ""),
    ("Name the chemical symbol of sodium.", ""),
    ("Rewrite the sentence in the passive voice.", "The committee approved the new budget on Monday."),
    ("Generate a list of five creative names for a coffee shop.", ""),
    ("Which country has the larger population?", "Canada or Australia"),
    ("Describe how a refrigerator keeps food cold.", ""),
    ("Find the error in the following code and fix it.", "def add(a, b):\n    return a - b"),
    ("What is the boiling point of water at sea level in Celsius?", ""),
    ("Write a polite email declining a meeting invitation.", ""),
    ("Identify the main character in the story.",
     "Maria woke before dawn, laced her boots and climbed the ridge to watch the sun rise over the valley."),
]


def build_prompts(count: int) -> list[str]:
    template = get_template("alpaca")
    return [template.render(*INSTRUCTIONS[index % len(INSTRUCTIONS)]) for index in range(count)]


def build_model(model_dir: str, device: str) -> Any:
    plan = plan_quantization("nf4", device)
    model = load_model(model_dir, plan, device=device)
    if device == "cpu":  # keep bnb on the dequantize + F.linear path CUDA takes for batches (see tests)
        import bitsandbytes

        for module in model.modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    torch.manual_seed(0)
    model = attach_lora(model, profile_lora(), quantized=True, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter is non-zero: perturb B (zero at init) the same way every run
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator) * 0.01
                parameter.copy_(noise.to(parameter.device, parameter.dtype))
    model.eval()
    return model, plan


def prepare(model: Any, variant: str, state: dict[str, str], device: str, *,
            dequantized_on_load: bool = False) -> str | None:
    """Bring the weights to what `variant` runs on, or refuse where an earlier variant's in-place change is past it;
    for auto and auto_folded, the weights as the evaluate stage names them. `dequantized_on_load`: the CPU
    loader's float64 path (load_for_inference), which left no 4-bit layers."""
    method, weights, lora = VARIANTS[variant]
    if method == "auto":
        resolved = resolve_generation_method("auto", device, model)
        if state["lora"] not in ("peft", lora):
            raise RuntimeError(f"{variant} must run before LoRA is {state['lora']} (in place)")
        described = prepare_for_generation(model, requested="auto", method=resolved, device=device, quantized=True,
                                           dequantized_on_load=dequantized_on_load, merge=False,
                                           fold=lora == "folded")
        state["weights"] = "dequantized" if "dequantized" in described else state["weights"]
        state["lora"] = "folded" if "+lora" in described else state["lora"]  # or folded by graphed_folded before
        if any(isinstance(module, GroupedLoraMember) for module in model.modules()):  # the name does not say
            state["lora"] = "grouped"
        return described
    if state["weights"] == "dequantized" and weights == "nf4":
        raise RuntimeError(f"{variant} must run before the dequantized variants (dequantization is in place)")
    if state["lora"] != "peft" and lora != state["lora"]:
        raise RuntimeError(f"{variant} must run before LoRA is {state['lora']} (in place)")
    if weights == "dequantized" and state["weights"] == "nf4":
        started = time.perf_counter()
        dequantize_for_generation(model)
        log.info("dequantized in %.1f s", time.perf_counter() - started)
        state["weights"] = "dequantized"
    if lora == "folded" and state["lora"] == "peft":
        fold_lora_for_generation(model)
    if lora == "grouped" and state["lora"] == "peft":
        group_lora_for_generation(model)
    if lora == "merged" and state["lora"] == "peft":
        merge_lora_for_generation(model)
    state["lora"] = lora
    return None
