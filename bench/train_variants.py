"""The models the train benches build, and the profile they take: a plain transformers + PEFT + bitsandbytes
baseline, and the train stage's own model (training.model.build_trainable_model) under each variant's switches.
Shared by train_bench, train_profile, budget_bench, ddp_bench, unsloth_bench, eval_bench and sure_model.

Variants:
- baseline: NF4 double-quant, the Mistral profile's LoRA (r=16 on the seven projections) with the reference dropout
            (REFERENCE_LORA_DROPOUT), gradient checkpointing, sdpa, AdamW, bf16 autocast, padded batches;
- project:  the train stage's code path (its model from training.model.build_trainable_model, its collators) with the
            Mistral profile's settings as the stage resolves them on CUDA (project_settings: Liger kernels, packing,
            frozen weights in bf16, gradient checkpointing, checkpoint offload, LoRA dropout);
- liger:    the train stage's code path with Liger kernels only (padded batches, PEFT's fp32 upcast);
- unpacked: project without packing (padded micro-batches);
- offload / gpu_checkpoints: project with checkpoints offloaded to pinned host memory / kept on the GPU;
- dropout:  project with the reference LoRA dropout instead of the profile's;
- nockpt:   project without gradient checkpointing (more memory, no recomputation);
- unfused / nockpt_unfused: project / nockpt with PEFT's own LoRA forward instead of the fused one
            (train.fused_lora, training/fused_lora.py: the adapter's term by addmm, a hand-written backward).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.profiles import profile_params
from alpaca_qlora.training.frozen_weights import keep_absmax, keep_dequantized
from alpaca_qlora.training.fused_lora import fused_4bit_bases
from alpaca_qlora.training.model import (
    SpeedSwitches,
    all_linear_targets,
    build_trainable_model,
    peft_target_modules,
    resolve_speed_switches,
    uses_all_linear,
)
from alpaca_qlora.training.packing import VARLEN_ATTENTION, packed_attention

log = logging.getLogger("train_bench")
ROOT = Path(__file__).resolve().parents[1]
MISTRAL_PROFILE = ROOT / "profiles" / "mistral-7b.yaml"


# The LoRA dropout the baseline (and Unsloth's reference variant) trains with: PEFT's QLoRA examples' value, and the
# Mistral profile's before it took Unsloth's dropout-0 fast path. The loss check of the profile's settings is
# against this baseline, so it covers the dropout change too.
REFERENCE_LORA_DROPOUT = 0.05


# The one place that holds the profile the bench's variants take: set once by each script's --profile (use_profile),
# read by train_bench, eval_bench, unsloth_bench and sure_model through bench_profile() and profile_lora().
_profile = {"path": MISTRAL_PROFILE}


def use_profile(path: str | Path) -> None:
    """The profile whose LoRA and speed settings every bench variant takes: the Mistral one unless a family's bench
    names its own (--profile)."""
    _profile["path"] = Path(path)


def bench_profile() -> Any:
    """The real run's params (the bench's profile over params.yaml), for every variant and script."""
    return profile_params(_profile["path"], ROOT / "params.yaml")


def profile_lora() -> Any:
    """LoRA as the real run sets it."""
    return bench_profile().lora


def baseline_model(model_dir: str, gradient_checkpointing: bool = True) -> Any:
    """transformers + PEFT + bitsandbytes as their docs show it: the reference every ratio is against."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, reference_lora_config(profile_lora()))


def reference_lora_config(lora: Any) -> Any:
    """The baseline's LoraConfig: the profile's rank, scaling and targets (all-linear as the train stage hands it
    to PEFT), the reference dropout."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=REFERENCE_LORA_DROPOUT, task_type="CAUSAL_LM",
                      target_modules=peft_target_modules(lora.target_modules))


def target_names(lora: Any, model_config: Any) -> list[str]:
    """The profile's LoRA targets as layer names, all-linear resolved by PEFT as the train stage resolves it: for a
    library that takes a list of names (Unsloth)."""
    if uses_all_linear(lora.target_modules):
        return all_linear_targets(model_config)
    return list(lora.target_modules)


def project_model(model_dir: str, *, liger: bool, gradient_checkpointing: bool, frozen_dtype: str,
                  checkpoint_offload: bool, lora_dropout: float, fused_lora: bool, shardable: bool = False) -> Any:
    """The train stage's model (training.model.build_trainable_model) with the variant's switches; `shardable`
    stores the 4-bit weights so FSDP can shard them, as the stage does under fsdp."""
    lora = dataclasses.replace(profile_lora(), dropout=lora_dropout)
    switches = SpeedSwitches(liger_kernels=liger, gradient_checkpointing=gradient_checkpointing, fused_lora=fused_lora)
    model = build_trainable_model(model_dir, plan_quantization("nf4", "cuda"), lora, switches, device="cuda",
                                  frozen_dtype=frozen_dtype, checkpoint_offload=checkpoint_offload,
                                  shardable=shardable)
    model.config.use_cache = False  # as training.trainer.run_training sets it
    return model


def project_settings(distributed: str = "none") -> dict[str, Any]:
    """The bench profile's speed settings on CUDA, as the train stage resolves them under `distributed`, plus
    whether it packs."""
    params = bench_profile()
    train = dataclasses.replace(params.train, distributed=distributed)
    switches = resolve_speed_switches(train, "cuda", params.lora, liger_installed=True)
    return {"liger": switches.liger_kernels, "gradient_checkpointing": switches.gradient_checkpointing,
            "fused_lora": switches.fused_lora, "frozen_dtype": params.train.frozen_dtype,
            "checkpoint_offload": params.train.checkpoint_offload, "lora_dropout": params.lora.dropout,
            "packing": params.train.packing}


# name: what the variant changes in the profile's settings (`project`: nothing)
VARIANTS: dict[str, dict[str, Any]] = {
    "project": {},
    "liger": {"gradient_checkpointing": True, "frozen_dtype": "fp32", "packing": False, "checkpoint_offload": False,
              "lora_dropout": REFERENCE_LORA_DROPOUT, "fused_lora": False},
    "unpacked": {"packing": False},
    "offload": {"checkpoint_offload": True},
    "gpu_checkpoints": {"checkpoint_offload": False},
    "dropout": {"lora_dropout": REFERENCE_LORA_DROPOUT, "fused_lora": False},  # as auto resolves it there
    "nockpt": {"gradient_checkpointing": False, "checkpoint_offload": False},
    "unfused": {"fused_lora": False},
    "nockpt_unfused": {"gradient_checkpointing": False, "checkpoint_offload": False, "fused_lora": False},
    # every frozen weight kept dequantized, as the memory plan does where the budget has room (80 GiB)
    "nockpt_dequantized": {"gradient_checkpointing": False, "checkpoint_offload": False, "dequantized": True},
    "dequantized": {"dequantized": True},
    # every frozen weight's block scales kept in fp32, as the memory plan does first where the budget holds them
    "scales": {"scales": True},
    "nockpt_scales": {"gradient_checkpointing": False, "checkpoint_offload": False, "scales": True},
}


def release_memory() -> float:
    """Free the previous variant for real (PEFT models hold reference cycles) and say what is still allocated."""
    gc.collect()
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 3)


def keep_frozen_forms(model: Any, *, dequantized: bool, scales: bool, dtype: torch.dtype) -> None:
    """Every fused 4-bit weight kept dequantized in `dtype`, or with its block scales in fp32: what the memory plan
    keeps where the budget has room for it in every layer (frozen_weights)."""
    if dequantized:
        keep_dequantized(fused_4bit_bases(model), dtype)
    if scales:
        keep_absmax(fused_4bit_bases(model))


def build_variant(model_dir: str, variant: str) -> tuple[Any, bool]:
    log.info("variant %s: %.3f GiB allocated before loading", variant, release_memory())
    if variant == "baseline":
        return baseline_model(model_dir), False
    settings = {**project_settings(), **VARIANTS[variant]}
    packing, dequantized = settings.pop("packing"), settings.pop("dequantized", False)
    scales = settings.pop("scales", False)
    model = project_model(model_dir, **settings)
    keep_frozen_forms(model, dequantized=dequantized, scales=scales, dtype=torch.bfloat16)
    if packing:
        packed_attention(model, "cuda")
    return model, packing


def uses_varlen(model: Any) -> bool:
    """Whether packed_attention switched the model to the variable-length kernel (its loss check applies)."""
    return model.get_base_model().config._attn_implementation == VARLEN_ATTENTION


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """--profile, the same in every bench script, so a family's figures all come from its own profile's LoRA (its
    targets: Phi-3's fused ones) and speed settings; the script passes it to use_profile."""
    parser.add_argument("--profile", type=Path, default=MISTRAL_PROFILE,
                        help="the profile whose LoRA and speed settings the variants take (default: Mistral's)")
