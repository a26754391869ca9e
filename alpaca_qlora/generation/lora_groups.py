"""PEFT's LoRA arithmetic for the projections that read the same input, run once per group instead of once per
projection: q/k/v of an attention layer, gate/up of an MLP.

At decoding batch sizes every kernel PEFT launches per adapted projection (the base GEMM, the input cast to the
adapter's dtype, the two adapter GEMMs, the scale, the add, the casts) is bound by launch and latency, not by
arithmetic. Folding the adapter into the compute dtype saves kernels but changes the adapter's precision, and with
it some answers. Grouping keeps PEFT's ops in PEFT's dtypes and order, on wider matrices: the base GEMM on the
members' weights stacked by rows, the cast once, lora_A on the stacked A matrices, lora_B on a block-diagonal B
(its zeros add exact zeros to every partial sum), then PEFT's scale, add and casts for the class of layer it is
(lora.Linear adds in the adapter's dtype and casts the sum back; the 4-bit class, kept after dequantization, casts
the adapter's output first). Each output element sums the same products as PEFT's; only the GEMM kernel, chosen
for the wider shape, may group those sums differently.

Every other adapted projection (o_proj, down_proj, Phi-3's fused ones) runs the same code as a group of one, on its
own weights. Groups of any size leave out the 4-bit class's copy of the base output, and round into the compute dtype
in the kernel that computes the value: the scaling's multiply writes the 4-bit class's cast adapter output, and
lora.Linear's last add writes its cast sum. An op whose output dtype differs from its inputs' computes in their
promoted dtype and rounds once on store, so the value is that of the op followed by the cast (tested bitwise on
CPU, where TensorIterator still stores through a temporary; on CUDA it is one kernel instead of two).

The first member the model calls (q_proj, gate_proj) computes the group's output and keeps the other members'
slices for the very same input tensor object; a member called with anything else computes on its own, as PEFT
does, so any call order stays correct. The checks are Python identity tests, with no host sync, so a CUDA graph
captures only the group's kernels. In a group of several, the members' weights become views into the stacked
ones: nothing is stored twice, and in-place updates of either stay visible to both. For inference: in training mode,
with an adapter disabled, merged, switched, replaced or rescaled, every member runs its own layer again.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from alpaca_qlora.generation.weights import DequantizedLinear, active_lora_layers, is_plain_lora

log = logging.getLogger(__name__)

# projections a decoder layer calls on one input, the first-called one first (Llama, Mistral, Qwen, Gemma)
GROUPED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# base layers whose forward is one F.linear on their weight (DequantizedLinear: with its casts around it)
GROUPABLE_BASES = (torch.nn.Linear, DequantizedLinear)


def _peft_lora_classes() -> dict[type, bool]:
    """PEFT's LoRA layer classes grouping reproduces -> whether that class casts the adapter's output to the base
    output's dtype before adding it (the 4-bit class) rather than casting the sum after (lora.Linear)."""
    from peft.tuners.lora import Linear

    classes = {Linear: False}
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes
        return classes
    return {**classes, Linear4bit: True}


def _stacked(holders: list[torch.nn.Module], attribute: str, *, block_diagonal: bool = False) -> torch.Tensor:
    """The holders' `attribute` tensors stacked by rows (or on a block diagonal, zeros off the blocks), each holder's
    parameter then made a view of its block, so the weights exist once."""
    parts = [getattr(holder, attribute) for holder in holders]
    stacked = torch.block_diag(*parts) if block_diagonal else torch.cat(parts)
    row = column = 0
    for holder, part in zip(holders, parts):
        block = stacked[row : row + part.shape[0]]
        if block_diagonal:
            block = block[:, column : column + part.shape[1]]
            column += part.shape[1]
        row += part.shape[0]
        setattr(holder, attribute, torch.nn.Parameter(block, requires_grad=part.requires_grad))
    return stacked


def _stacked_base(bases: list[torch.nn.Linear]) -> torch.nn.Linear:
    """A layer of the bases' own class over their stacked weights and biases, which it holds as buffers: the model's
    parameters (the members' views) still count each weight once."""
    first = bases[0]
    with torch.device("meta"):
        stacked = type(first)(first.in_features, sum(base.out_features for base in bases), bias=False)
    del stacked.weight, stacked.bias
    stacked.register_buffer("weight", _stacked(bases, "weight"), persistent=False)
    stacked.register_buffer("bias", _stacked(bases, "bias") if first.bias is not None else None, persistent=False)
    return stacked.train(first.training)


def _rounded(op: Any, first: torch.Tensor, second: Any, *, dtype: torch.dtype | None) -> torch.Tensor:
    """`op(first, second).to(dtype)` in one kernel: computed in the operands' promoted dtype, rounded into `dtype` as
    it is stored. Two kernels where autograd records the op (an out= op has no gradient) or no cast is asked for."""
    if dtype is None:
        return op(first, second)
    if torch.is_grad_enabled() and any(isinstance(operand, torch.Tensor) and operand.requires_grad
                                       for operand in (first, second)):
        return op(first, second).to(dtype)
    return op(first, second, out=torch.empty(first.shape, dtype=dtype, device=first.device))


class LoraGroup(torch.nn.Module):
    """The stacked weights of a group's PEFT LoRA layers (a group of one: its layer's own) and the forward of their
    class, plus the slices the first member's call left for the others."""

    def __init__(self, layers: list[Any], adapters: list[str], casts_adapter_output: bool):
        super().__init__()
        self.layers = tuple(layers)  # a tuple: not registered here, their wrappers own them
        self.active_adapters = list(layers[0].active_adapters)  # as grouped: a switch ends the grouping
        self.casts_adapter_output = casts_adapter_output
        self.adapters = list(adapters)
        # a group of one reads its layer's own base and adapter weights at each call: nothing to stack
        self.base_layer = _stacked_base([layer.get_base_layer() for layer in layers]) if len(layers) > 1 else None
        for index, adapter in enumerate(adapters if len(layers) > 1 else []):  # buffers: the members' are views
            self.register_buffer(f"lora_down_{index}", _stacked([layer.lora_A[adapter] for layer in layers],
                                                                "weight"), persistent=False)
            self.register_buffer(f"lora_up_{index}", _stacked([layer.lora_B[adapter] for layer in layers], "weight",
                                                              block_diagonal=True), persistent=False)
        self.scalings = [layers[0].scaling[adapter] for adapter in adapters]
        self.out_features = [layer.get_base_layer().out_features for layer in layers]
        self._input: torch.Tensor | None = None
        self._left: list[torch.Tensor | None] = []

    def applies(self) -> bool:
        """Whether the layers are still as grouped (eval mode, adapters active, unmerged, scalings unchanged): host
        state only."""
        return not self.training and all(
            not layer.disable_adapters and not layer.merged and list(layer.active_adapters) == self.active_adapters
            and [layer.scaling[adapter] for adapter in self.adapters] == self.scalings for layer in self.layers)

    def _weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `index`'s A and B: stacked and block-diagonal, or a group of one's own."""
        if self.base_layer is None:
            layer, adapter = self.layers[0], self.adapters[index]
            return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        return getattr(self, f"lora_down_{index}"), getattr(self, f"lora_up_{index}")

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's forward for the group's class, on the group's weights (PEFT's 4-bit class also clones the base
        output, for autograd: a copy, no value changes, left out). Dropout is the identity in eval mode."""
        base = self.base_layer if self.base_layer is not None else self.layers[0].get_base_layer()
        result = base(x)
        result_dtype = result.dtype
        converts = not self.casts_adapter_output or not torch.is_autocast_enabled()
        last = len(self.scalings) - 1
        for index, scaling in enumerate(self.scalings):
            down, up = self._weights(index)
            if converts:
                x = self.layers[0]._cast_input_dtype(x, down.dtype)
            output = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
            if self.casts_adapter_output:  # the 4-bit class: (output * scaling).to(result's dtype), then the add
                result = result + _rounded(torch.mul, output, scaling, dtype=result_dtype if converts else None)
            else:  # lora.Linear: result + output * scaling, the sum cast back after the last adapter
                result = _rounded(torch.add, result, output * scaling, dtype=result_dtype if index == last else None)
        return result

    def first_output(self, x: torch.Tensor) -> torch.Tensor:
        """The first member's output; the others' slices are kept for a call with this same `x`."""
        if len(self.layers) == 1:
            return self._output(x)
        first, *others = self._output(x).split(self.out_features, dim=-1)
        self._input, self._left = x, [None, *others]
        return first

    def left_output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s slice of the group's last output if that was computed from this very `x`, else None;
        forgets what the group kept once it is handed out or can no longer be."""
        output = self._left[index] if self._input is x and index < len(self._left) else None
        if output is None:
            self._input, self._left = None, []
            return None
        self._left[index] = None
        if all(left is None for left in self._left):
            self._input, self._left = None, []
        return output


class GroupedLoraMember(torch.nn.Module):
    """Stands where a grouped PEFT LoRA layer stood: the group's slice where the group applies, else the layer's own
    forward (also for a layer merged or folded into something else since)."""

    def __init__(self, lora_layer: Any, group: LoraGroup, index: int):
        super().__init__()
        self.lora_layer, self.group, self.index = lora_layer, group, index

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        grouped = (not args and not kwargs and self.lora_layer is self.group.layers[self.index]
                   and self.group.applies())
        if grouped and self.index == 0:
            return self.group.first_output(x)
        output = self.group.left_output(self.index, x) if grouped else None
        return output if output is not None else self.lora_layer(x, *args, **kwargs)


def _groupable(layers: list[Any], adapters: list[list[str]]) -> bool:
    """Same PEFT class and state, same plain adapters with the same dtypes and scalings, over dequantized bases of one
    class, dtype, device, input size and bias presence: what makes the group's arithmetic each member's."""
    first, bases = layers[0], [layer.get_base_layer() for layer in layers]
    if type(first) not in _peft_lora_classes() or type(bases[0]) not in GROUPABLE_BASES or not adapters[0]:
        return False

    def signature(layer: Any, base: Any, names: list[str]) -> tuple:
        return (type(layer), names, list(layer.active_adapters), getattr(layer, "cast_input_dtype_enabled", True),
                type(base), base.weight.dtype, base.weight.device, base.in_features, base.bias is None,
                [(layer.scaling[name], layer.lora_A[name].weight.dtype, layer.lora_B[name].weight.dtype)
                 for name in names])

    signatures = [signature(layer, base, names) for layer, base, names in zip(layers, bases, adapters)]
    return (all(is_plain_lora(layer, names) for layer, names in zip(layers, adapters))
            and all(item == signatures[0] for item in signatures))


def group_lora_for_generation(model: Any) -> int:
    """Put every group of PEFT LoRA projections that read one input (GROUPED_PROJECTIONS) and qualify behind one
    LoraGroup, and every other qualifying LoRA projection behind a group of its own; returns how many groups were
    made. Run after dequantizing (4-bit bases do not qualify) and after any folding or merging; layers that do not
    qualify stay as PEFT has them."""
    by_parent: dict[int, tuple[Any, dict[str, tuple[Any, list[str]]]]] = {}
    for parent, name, layer, adapters in active_lora_layers(model):
        if isinstance(parent, GroupedLoraMember):  # grouped before: left as it is
            continue
        by_parent.setdefault(id(parent), (parent, {}))[1][name] = (layer, adapters)
    made = alone = 0
    for parent, layers in by_parent.values():
        groups = [names for names in GROUPED_PROJECTIONS if all(name in layers for name in names)
                  and _groupable([layers[name][0] for name in names], [layers[name][1] for name in names])]
        grouped = {name for names in groups for name in names}
        groups += [(name,) for name in layers if name not in grouped and _groupable([layers[name][0]],
                                                                                     [layers[name][1]])]
        for names in groups:
            members = [layers[name][0] for name in names]
            with torch.no_grad():
                group = LoraGroup(members, layers[names[0]][1], _peft_lora_classes()[type(members[0])])
            for index, (name, member) in enumerate(zip(names, members)):
                setattr(parent, name, GroupedLoraMember(member, group, index).train(member.training))
            made += 1
            alone += len(names) == 1
    if made:
        log.info("LoRA for generation: %d groups of projections reading one input, %d projections on their own",
                 made - alone, alone)
    return made
