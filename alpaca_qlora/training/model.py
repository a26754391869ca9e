"""The model the train stage trains: the base as the quantization plan says, Liger's kernels, then LoRA.

Built in one function (`build_trainable_model`) so the bench measures the stage's own sequence.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.config import ALL_LINEAR, LoraParams
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import QuantizationPlan
from alpaca_qlora.training.fused_lora import fuse_lora_layers, fuses
from alpaca_qlora.training.offload import enable_checkpoint_offload

log = logging.getLogger(__name__)

# Liger's kernels for the decoder. The fused linear cross-entropy never materializes the (tokens x vocabulary)
# logits, the largest activation of a 7B model's training step; with it, Liger's plain cross-entropy is unused.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": True}
# `lora:` keys whose LoraConfig argument has another name; the others keep theirs.
LORA_CONFIG_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


@dataclass(frozen=True)
class SpeedSwitches:
    liger_kernels: bool
    gradient_checkpointing: bool
    fused_lora: bool = False


def resolve_speed_switches(train: Any, device: str, lora: Any = None, *,
                           liger_installed: bool | None = None) -> SpeedSwitches:
    """`auto` turns Liger kernels, gradient checkpointing and fused LoRA on for CUDA, where they were measured
    paying (README, "GPU numbers"), and off on CPU, where a small model needs no checkpointing and Triton does
    not run. Liger on auto also needs liger-kernel installed; without it training goes on unfused, with a warning.
    Fused LoRA on auto also needs a `lora` it computes (plain, dropout 0) and no fsdp, under which it is untested."""
    on_cuda = device == "cuda"
    fused = bool(train.fused_lora)
    if train.fused_lora == "auto":
        fused = on_cuda and train.distributed != "fsdp" and lora is not None and fuses(lora)
    elif fused and train.distributed == "fsdp":
        log.warning("train.fused_lora=true under fsdp: the fused backward re-dequantizes each sharded 4-bit weight "
                    "where FSDP has gathered it, which no test covers yet (auto keeps it off under fsdp)")
    checkpointing = on_cuda if train.gradient_checkpointing == "auto" else bool(train.gradient_checkpointing)
    liger = bool(train.liger_kernels)
    if train.liger_kernels == "auto":
        if liger_installed is None:
            liger_installed = importlib.util.find_spec("liger_kernel") is not None
        liger = on_cuda and liger_installed
        if on_cuda and not liger_installed:
            log.warning("train.liger_kernels=auto: liger-kernel is not installed, so training runs without its fused "
                        "kernels (pip install liger-kernel: faster, and less memory)")
    if train.checkpoint_offload and not checkpointing:
        raise PipelineError("train.checkpoint_offload=true moves gradient checkpoints to host memory, but gradient "
                            f"checkpointing is off on {device} (train.gradient_checkpointing="
                            f"{train.gradient_checkpointing}); set train.gradient_checkpointing=true.")
    return SpeedSwitches(liger_kernels=liger, gradient_checkpointing=checkpointing, fused_lora=fused)


def apply_liger_kernels(model: torch.nn.Module, device: str) -> None:
    """Liger's Triton kernels patched into the model, through transformers' own Liger integration.

    Not `TrainingArguments(use_liger_kernel=True)`, which calls the same function with the same config: it patches
    only inside `Trainer.train()`, so the model this module builds (and the bench measures) would not be the one
    trained. CUDA only: asked for elsewhere it is an error, never a silent no-op.
    """
    if device != "cuda":
        raise PipelineError("train.liger_kernels=true needs a CUDA GPU (Triton kernels); set it to false here.")
    from transformers.integrations.liger import apply_liger_kernel

    try:
        apply_liger_kernel(model, LIGER_KERNELS)
    except ImportError as error:
        raise PipelineError(f"train.liger_kernels=true but liger-kernel is not importable ({error}).") from error


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """The suffixes (q_proj, qkv_proj, lm_head, ...) of the model's linear layers, 4-bit ones included: the names a
    LoRA target can match."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")}


def validate_target_modules(model: torch.nn.Module, target_modules: Sequence[str]) -> None:
    """Every requested LoRA target must exist, or a typo would silently train fewer modules (all-linear always
    does: it names no layer)."""
    linear_names = linear_layer_names(model)
    missing = [name for name in target_modules if name != ALL_LINEAR and name not in linear_names]
    if missing:
        raise PipelineError(
            f"lora.target_modules {missing} do not exist in this model; its linear layers are: "
            f"{', '.join(sorted(linear_names))}."
        )


def uses_all_linear(target_modules: Sequence[str]) -> bool:
    return tuple(target_modules) == (ALL_LINEAR,)


def peft_target_modules(target_modules: Sequence[str]) -> str | list[str]:
    """LoraConfig's target_modules: PEFT reads all-linear only as a bare string (in a list it is a module name)."""
    return ALL_LINEAR if uses_all_linear(target_modules) else list(target_modules)


def weightless_model(config: Any) -> torch.nn.Module:
    """The architecture of `config` on the meta device: its module names and shapes, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def all_linear_targets(config: Any) -> list[str]:
    """What all-linear wraps in this architecture, resolved by PEFT itself on a weightless copy: known before LoRA's
    weights are allocated, without a copy of PEFT's rule here."""
    from peft import LoraConfig, LoraModel

    tuner = LoraModel(weightless_model(config), LoraConfig(target_modules=ALL_LINEAR), "default",
                      low_cpu_mem_usage=True)
    return sorted({name.rsplit(".", 1)[-1] for name in tuner.targeted_module_names})


def check_targets_before_loading(source: str, target_modules: Sequence[str]) -> None:
    """A target that matches nothing fails from config.json alone, in seconds, not after a 7B base has loaded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:  # loading the model says what is wrong with the source
        log.debug("lora.target_modules are checked after loading: no config for %s (%s)", source, error)
        return
    validate_target_modules(weightless_model(config), target_modules)


def targeted_modules(model: Any) -> list[str]:
    """The module names (suffixes) PEFT wrapped, sorted: what the run trained, all-linear resolved."""
    return sorted({name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names})


# Above this share of the base model's weights the adapter costs much of the memory that LoRA exists to save.
LARGE_ADAPTER_SHARE = 0.25


def _stored_count(parameter: torch.nn.Parameter) -> int:
    """A weight's element count; bitsandbytes packs two 4-bit values per stored byte."""
    return parameter.numel() * (2 if type(parameter).__name__ == "Params4bit" else 1)


def validate_lora_rank(model: torch.nn.Module, lora: Any, targets: Sequence[str] | None = None) -> None:
    """Refuse a rank above an adapted layer's smaller side, before PEFT allocates it (a rank of 100000 ran out of
    memory in the allocator): no update of that layer has a higher rank. Equal is a full-rank update, legal if
    unusual. Warn when the adapter would be a large share of the model. `targets`: the names LoRA wraps, where
    lora.target_modules does not list them (all-linear)."""
    targets = lora.target_modules if targets is None else targets
    layers = [(name, module) for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features")]
    if not layers:
        return
    name, smallest = min(layers, key=lambda item: min(item[1].in_features, item[1].out_features))
    limit = min(smallest.in_features, smallest.out_features)
    if lora.r > limit:
        raise PipelineError(
            f"lora.r = {lora.r} is too large for the layers it adapts: {name.rsplit('.', 1)[-1]} is "
            f"{smallest.in_features} x {smallest.out_features}, so lora.r can be at most {limit} (LoRA is a low-rank "
            f"update; 8 to 64 is usual).")
    adapter = sum(lora.r * (module.in_features + module.out_features) for _, module in layers)
    base = sum(_stored_count(parameter) for parameter in model.parameters())
    if adapter > LARGE_ADAPTER_SHARE * base:
        log.warning("lora.r = %d makes an adapter of %d parameters, %.0f%% of the model's %d: it costs much of the "
                    "memory LoRA saves; a lower lora.r (8 to 64 is usual) trains almost as well", lora.r, adapter,
                    100 * adapter / base, base)


def prepare_quantized_model(model: torch.nn.Module, *, gradient_checkpointing: bool, frozen_dtype: str) -> Any:
    """Freeze the base and make its inputs carry gradients, as QLoRA needs.

    frozen_dtype="fp32" is PEFT's `prepare_model_for_kbit_training`: it upcasts every frozen non-4-bit weight
    (embeddings, norms, lm_head) to fp32, which makes the residual stream fp32 and doubles the checkpointed
    activations. "compute" keeps them in the compute dtype (what Unsloth does): less memory, bf16 residuals.
    """
    if frozen_dtype == "fp32":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing per decoder layer; the embeddings' output must carry gradients for it."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers' new name; the old one warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def lora_config_kwargs(lora: Any) -> dict[str, Any]:
    """Every `lora:` key as PEFT's LoraConfig argument: the same name but where LORA_CONFIG_NAMES renames it.

    Read by the fields of LoraParams, so the stage's declared-keys view and a LoraParams both work, and a key added
    to LoraParams reaches PEFT without a line here."""
    values = {field.name: getattr(lora, field.name) for field in dataclasses.fields(LoraParams)}
    values["target_modules"] = peft_target_modules(values["target_modules"])
    return {LORA_CONFIG_NAMES.get(name, name): value for name, value in values.items()}


def attach_lora(model: torch.nn.Module, lora: Any, *, quantized: bool, gradient_checkpointing: bool,
                frozen_dtype: str = "compute", checkpoint_offload: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model

    validate_target_modules(model, lora.target_modules)
    validate_lora_rank(model, lora, all_linear_targets(model.config) if uses_all_linear(lora.target_modules) else None)
    if quantized:
        model = prepare_quantized_model(model, gradient_checkpointing=gradient_checkpointing,
                                        frozen_dtype=frozen_dtype)
    elif gradient_checkpointing:
        enable_checkpointing(model)
    if checkpoint_offload:
        log.info("checkpoint offload: %d decoder layers keep their checkpoints in host memory",
                 enable_checkpoint_offload(model))
    return get_peft_model(model, LoraConfig(**lora_config_kwargs(lora), task_type="CAUSAL_LM"))


def build_trainable_model(source: str, plan: QuantizationPlan, lora: Any, switches: SpeedSwitches, *, device: str,
                          frozen_dtype: str = "compute", checkpoint_offload: bool = False,
                          shardable: bool = False) -> Any:
    """The train stage's model, built in one place so the bench measures the stage's own sequence: the base as the
    plan says, Liger's kernels patched in before PEFT wraps the modules, then LoRA (and checkpointing) attached."""
    check_targets_before_loading(source, lora.target_modules)
    model = load_model(source, plan, device=device, shardable=shardable)
    if switches.liger_kernels:
        apply_liger_kernels(model, device)
    model = attach_lora(model, lora, quantized=plan.quantized, gradient_checkpointing=switches.gradient_checkpointing,
                        frozen_dtype=frozen_dtype, checkpoint_offload=checkpoint_offload)
    if switches.fused_lora:
        fuse_lora_layers(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable params: %d of %d (%.3f%%); LoRA on %s", trainable, total, 100 * trainable / total,
             ", ".join(targeted_modules(model)))
    return model

