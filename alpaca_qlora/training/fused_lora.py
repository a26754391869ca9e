"""Each LoRA projection as one autograd function: the frozen base's matmul and the adapter's in a few kernels.

PEFT runs a LoRA Linear as separate modules: the base layer (bitsandbytes dequantizes its 4-bit weight and multiplies),
a copy of the base output, lora_A, lora_B, a multiply by the scaling and an add; autograd mirrors each in backward and
sums the base's and the adapter's input gradients. The multiply, add, copy and sum are elementwise kernels over the
layer's whole output or input, on top of the GEMMs. Here, as in Unsloth's fast_lora, the adapter's term is accumulated
into the base output by an addmm whose alpha is the scaling, and backward, written by hand, reads the frozen weight
again (in the form the memory plan keeps: frozen_weights), accumulates the adapter's share of the input gradient into
the base's by another addmm, and computes no gradient for the frozen weight.

The dtypes are PEFT and bitsandbytes' own, decided before the function runs: under autocast every matmul runs in the
autocast dtype (fp32 LoRA weights cast to it, their gradients cast back), as autocast does to PEFT's lora_A and lora_B;
without it, in the base's compute dtype, which must then be the LoRA weights' dtype. A call the fused function does not
reproduce (adapters disabled or merged, several active, mixed dtypes without autocast) runs PEFT's forward.

`fuse_lora_layers` swaps each layer's forward and gives the layers one ComputeCopies (renewed by hooks): their
parameters and names (what PEFT saves), the optimizer's view of them and gradient checkpointing are untouched. LoRA
dropout must be 0: its mask sits between the input and lora_A, and this backward keeps the input unmasked.
"""
from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.quantization import is_4bit
from alpaca_qlora.training.frozen_weights import frozen_bias, frozen_weight

log = logging.getLogger(__name__)
COMPUTE_COPIES = "lora_compute_copies"  # the attribute fuse_lora_layers sets on each layer: the model's ComputeCopies
COPIES_HOOK = "lora_compute_copies_hook"  # on the fused model: the handle of the hook that makes its copies stale


def fused_4bit_bases(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The 4-bit base layers under `module` (a decoder layer, say) whose LoRA runs the fused function: the weights
    whose kept forms (frozen_weights) it would read."""
    return [layer.get_base_layer() for layer in module.modules()
            if getattr(layer.forward, "__func__", None) is fused_lora_forward and is_4bit(layer.get_base_layer())]


def scaled_gradient(gradient: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """`gradient * scaling` in the parameter's dtype: the scaling and the cast back from the compute dtype in one
    elementwise pass over an adapter-sized tensor."""
    return torch.mul(gradient, scaling, out=torch.empty_like(gradient, dtype=dtype))


class ComputeCopies:
    """The model's LoRA weights in the compute dtype, cast all at once at the first fused call of each model forward:
    one concatenation into the compute dtype for every adapted layer, instead of two casts a layer, each a kernel
    launch whose host cost sets the pace at small micro-batches. A recomputed (checkpointed) forward, inside backward,
    gets the very copies its first forward used. Stale at every forward of the transformer itself (the pre-hook
    fuse_lora_layers registers), whatever changed the weights since: not version counters, which a fused AdamW step
    and `param.data` writes leave unmoved. Weights it cannot concatenate (sharded DTensors, several devices) are cast
    one by one, as before."""

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        plain = all(type(parameter.data) is torch.Tensor for parameter in parameters)
        one_device = len({parameter.device for parameter in parameters}) == 1
        self.parameters = parameters if plain and one_device else []
        self.index = {id(parameter): position for position, parameter in enumerate(self.parameters)}
        self.copies: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None
        self.stale = True

    def invalidate(self, *_: Any) -> None:
        self.stale = True

    def get(self, parameter: torch.nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
        """`parameter` in `dtype`, from the current copies (renewed first if stale)."""
        position = self.index.get(id(parameter))
        if position is None:
            return parameter.to(dtype)
        if self.stale or dtype != self.dtype:
            self.refresh(dtype)
        return self.copies[position]

    @torch.no_grad()
    def refresh(self, dtype: torch.dtype) -> None:
        """Every registered weight cast into one new buffer (new, so copies saved for an earlier backward stay)."""
        sizes = [parameter.numel() for parameter in self.parameters]
        flat = torch.empty(sum(sizes), dtype=dtype, device=self.parameters[0].device)
        torch.cat([parameter.detach().reshape(-1) for parameter in self.parameters], out=flat)
        self.copies = [part.view(parameter.shape)
                       for part, parameter in zip(flat.split(sizes), self.parameters, strict=True)]
        self.dtype, self.stale = dtype, False


class FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + scaling * (x A^T) B^T for a frozen W (4-bit or not) and trainable A (r x in), B (out x r).

    Every tensor the matmuls see is already in `dtype` (autocast then casts nothing), so backward needs no autocast
    state (no custom_fwd/custom_bwd): it computes in the dtype forward saved its tensors in. Saves x, the compute-dtype
    A and B, and x A^T (r columns: what PEFT's lora_B keeps for its weight gradient too).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.nn.Module,
                scaling: float, dtype: torch.dtype, copies: ComputeCopies | None = None) -> torch.Tensor:
        inputs = x.reshape(-1, x.shape[-1])
        a, b = (lora_a.to(dtype), lora_b.to(dtype)) if copies is None else (copies.get(lora_a, dtype),
                                                                             copies.get(lora_b, dtype))
        output = F.linear(inputs, frozen_weight(base, dtype), frozen_bias(base, dtype))
        down = inputs @ a.t()
        output.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(inputs, a, b, down)
        ctx.base, ctx.scaling, ctx.lora_dtypes = base, scaling, (lora_a.dtype, lora_b.dtype)
        return output.view(*x.shape[:-1], output.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, a, b, down = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_down = grad @ b  # dL/d(x A^T) before the scaling: (tokens x r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ frozen_weight(ctx.base, grad.dtype)
            grad_x.addmm_(grad_down, a, alpha=ctx.scaling)
            grad_x = grad_x.view(*grad_output.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_a = scaled_gradient(grad_down.t() @ inputs, ctx.scaling, ctx.lora_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = scaled_gradient(grad.t() @ down, ctx.scaling, ctx.lora_dtypes[1])
        return grad_x, grad_a, grad_b, None, None, None, None


def compute_dtype(layer: Any, x: torch.Tensor) -> torch.dtype | None:
    """The one dtype PEFT's forward of `layer` computes in for this input, or None where the fused function would not
    reproduce it: adapters disabled or merged, several (or no) active adapters, or, without autocast, LoRA weights in
    another dtype than the base computes in (PEFT then computes the two terms in different dtypes)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    base = layer.get_base_layer()
    if is_4bit(base):
        if not base.compute_type_is_set:  # what Linear4bit.forward does on its first call
            base.set_compute_type(x)
            base.compute_type_is_set = True
        dtype = base.compute_dtype or x.dtype
    else:
        dtype = base.weight.dtype
    return dtype if layer.lora_A[adapter].weight.dtype == dtype == layer.lora_B[adapter].weight.dtype else None


def fused_lora_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward `fuse_lora_layers` gives a PEFT LoRA Linear; PEFT's own where the fused one does not apply.

    The output's dtype is PEFT's: a 4-bit base hands back the input's dtype, a plain Linear its compute dtype."""
    dtype = None if args or kwargs else compute_dtype(layer, x)
    if dtype is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    adapter = layer.active_adapters[0]
    base = layer.get_base_layer()
    output = FusedLoraLinear.apply(x.to(dtype), layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, base,
                                   layer.scaling[adapter], dtype, layer.__dict__.get(COMPUTE_COPIES))
    return output.to(x.dtype) if is_4bit(base) else output


def is_lora_linear(module: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a plain Linear or a bitsandbytes 4-bit one (not 8-bit, embeddings, convolutions)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return False
    base = module.get_base_layer()
    return type(base) is torch.nn.Linear or is_4bit(base)


def fuses(lora: Any) -> bool:
    """Whether a `lora:` config gives layers fusion_obstacles finds none in: plain LoRA, no dropout, frozen biases."""
    return lora.dropout == 0 and lora.bias == "none" and not lora.use_dora


def fusion_obstacles(layer: Any) -> list[str]:
    """Why the fused function would compute something else than PEFT for this layer (empty when it would not)."""
    base = layer.get_base_layer()
    obstacles = [f"lora.dropout={dropout.p} (adapter {name})" for name, dropout in layer.lora_dropout.items()
                 if not isinstance(dropout, torch.nn.Identity)]
    obstacles += [f"a LoRA variant ({type(variant).__name__})" for variant in layer.lora_variant.values()]
    obstacles += ["a bias on lora_B" for lora_b in layer.lora_B.values() if lora_b.bias is not None]
    if any(parameter.requires_grad for parameter in base.parameters()):
        obstacles.append("a trainable base weight or bias (lora.bias)")
    return obstacles


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA Linear of `model` the fused forward; returns how many.

    Refuses (PipelineError) when any of them could not be fused, rather than fusing some: a run is either wholly on
    the fused path or not, so a measurement says which one it measured."""
    layers = [(name, module) for name, module in model.named_modules() if is_lora_linear(module)]
    refused = {name: obstacles for name, module in layers if (obstacles := fusion_obstacles(module))}
    if refused:
        name, obstacles = next(iter(refused.items()))
        raise PipelineError(f"fused LoRA computes a plain LoRA over a frozen base; {len(refused)} layers have more "
                            f"(e.g. {name}: {', '.join(obstacles)}). Set lora.dropout=0 and lora.bias=none for it.")
    copies = ComputeCopies([parameter for _, layer in layers for adapters in (layer.lora_A, layer.lora_B)
                            for module in adapters.values() for parameter in module.parameters()])
    if COPIES_HOOK in model.__dict__:  # fused before: the earlier copies' hook goes
        model.__dict__[COPIES_HOOK].remove()
    # at every forward of the transformer itself, which PeftModel's forward and generate both reach
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.__dict__[COPIES_HOOK] = inner.register_forward_pre_hook(copies.invalidate)
    for _, layer in layers:
        layer.forward = types.MethodType(fused_lora_forward, layer)
        layer.__dict__[COMPUTE_COPIES] = copies
    log.info("fused LoRA: %d layers run base and adapter as one autograd function each", len(layers))
    return len(layers)
