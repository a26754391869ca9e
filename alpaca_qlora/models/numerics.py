"""The numeric path of generation on CPU, chosen so that answers do not depend on which CPU computes them.

fp32 kernels sum in an order set by the instruction set (AVX2, AVX512, AMX) and by the BLAS code path MKL picks for
the CPU, so the same model's logits differ in their last bits from one CPU to another; over dozens of greedy tokens
that flips near-tied argmaxes, and the answers change. On CPU we therefore generate in float64:

- 4-bit NF4 weights are dequantized once, with bitsandbytes' own dequantize_4bit (a table look-up times a block
  scale: one rounding, the same on every CPU), and held in float64; full-precision and LoRA weights are widened to
  float64 exactly. The kernel-order differences then sit ~2**29 times below fp32's, far under any logit gap a
  greedy pick could hinge on.
- No bitsandbytes 4-bit layer is left, so its AVX512-BF16 path (which repacks the weights at the first eval-mode
  forward and computes in bf16, only on CPUs that have the instruction) cannot be taken.
- transformers' RMSNorm computes its variance in fp32 whatever its input; a layer that provably computes
  weight * x / rms(x) is replaced by the same formula in float64 (checked on a probe input before replacing).

CUDA keeps its bf16 path (the compute dtype of the quantization plan); this module only describes it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.generation import dequantize_for_generation
from alpaca_qlora.generation.near_ties import NEAR_TIE_MARGIN
from alpaca_qlora.io import sha256_file

log = logging.getLogger(__name__)

CPU_GENERATION_DTYPE = torch.float64
# Files that decide a base model's answers: weights and tokenizer (config.json is small and shape-only here).
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                        "config.json")


class Float64RMSNorm(torch.nn.Module):
    """(offset + weight) * x / sqrt(mean(x**2) + eps), computed in the input's dtype (float64 here), never narrowed
    to fp32. `offset` is 0 for Llama's formula and 1 for Gemma's, whose own forward computes in fp32."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps, self.offset = float(eps), float(offset)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        scale = self.weight.to(hidden_states.dtype) + self.offset
        return scale * (hidden_states * torch.rsqrt(variance + self.eps))


def _rms_norm_replacement(module: torch.nn.Module) -> Float64RMSNorm | None:
    """A Float64RMSNorm for `module` if it is an RMSNorm of either formula (Llama, Mistral, Qwen, SmolLM2, Phi-3:
    weight; Gemma: 1 + weight), as a probe input shows; None for anything else (LayerNorm, ...), which keeps its own
    forward."""
    if not type(module).__name__.endswith("RMSNorm"):
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    probe = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        expected = module(probe.to(weight.dtype)).float()
    for offset in (0.0, 1.0):
        candidate = Float64RMSNorm(weight.float(), eps, offset)
        with torch.no_grad():
            if torch.allclose(expected, candidate(probe).float(), rtol=1e-3, atol=1e-4):
                candidate.train(module.training)
                return candidate
    return None


EAGER_FLOAT64 = "eager_float64"


def eager_float64_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (Gemma 2's, soft-capping included) with its softmax kept in float64. The
    library's casts the scores to fp32 for the softmax: the float64 mask's minimum becomes -inf there, a left-padded
    row's padding positions (masked everywhere) turn NaN, and 0 x NaN spreads it to the row's real tokens."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (module.head_dim**-0.5 if scaling is None else scaling)
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.dropout(torch.softmax(weights, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def float64_attention(model: torch.nn.Module) -> str:
    """Eager attention switched to eager_float64_attention (masks as for eager); sdpa stays, it keeps float64.
    Returns what the kernel path records."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = base.config._attn_implementation
    if own != "eager":
        return own
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(EAGER_FLOAT64, eager_float64_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EAGER_FLOAT64, eager_mask)
    base.set_attn_implementation(EAGER_FLOAT64)
    return "eager attention with its softmax in float64"


def float64_norms(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Replace every RMSNorm of the plain formula by Float64RMSNorm; returns the count and the classes kept."""
    replaced, kept = 0, set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not type(child).__name__.endswith("Norm"):
                continue
            replacement = _rms_norm_replacement(child)
            if replacement is None:
                kept.add(type(child).__name__)
                continue
            setattr(parent, name, replacement)
            replaced += 1
    return replaced, sorted(kept)


def to_cpu_float64(model: torch.nn.Module, *, quantized: bool) -> dict[str, Any]:
    """Put a loaded model (base, or PEFT model with its adapter unmerged) on the float64 CPU path, before its first
    forward; returns the numeric path for the metrics."""
    dequantized = dequantize_for_generation(model)
    norms, kept = float64_norms(model)
    # nn.Module's own .to: transformers refuses a dtype cast of a bitsandbytes-loaded model, which no longer holds
    # a 4-bit layer here
    torch.nn.Module.to(model, CPU_GENERATION_DTYPE)
    attention = float64_attention(model)
    model.eval()
    log.info("CPU generation in float64: %d 4-bit layers dequantized, %d RMSNorm layers in float64", dequantized,
             norms)
    return {
        "device": "cpu",
        "compute_dtype": "float64",
        "weights": "nf4 dequantized once to float64" if quantized and dequantized else "float64 (widened exactly)",
        "adapter_weights": "float64, unmerged",
        "kernel_path": f"torch CPU float64 (F.linear, {attention}); no bitsandbytes 4-bit kernel",
        "norms": f"{norms} RMSNorm layers in float64" + (f"; kept as the model computes them: {', '.join(kept)}"
                                                         if kept else ""),
        "rotary": "cos/sin in fp32 as transformers computes them, then float64",
        "greedy_pick": "argmax of the logits cast to fp32 (as generate() does)",
    }


def float32_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """The float64 model's copy in float32, for the fast loop to decode with while float64 decides the near ties
    (generation/near_ties.py). Exact: every float64 weight here was widened from float32 (NF4 dequantized once, fp32
    adapters), so narrowing it back loses nothing. None where float32 matmuls may run in a narrower type (a
    `torch.set_float32_matmul_precision` other than highest lets oneDNN use bf16 or TF32), which would break the
    error bound the margin rests on, and None where the host has not the memory for it: float64 alone gives the same
    answers, more slowly, where a copy that does not fit would end the evaluation."""
    precisions = {torch.get_float32_matmul_precision(),
                  getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")}
    if not precisions <= {"highest", "none", "ieee"}:
        log.warning("float32 matmul precision %s: decoding in float64 alone", sorted(precisions))
        return None
    tensors = [tensor for tensor in [*model.parameters(), *model.buffers()] if tensor.is_floating_point()]
    needed = sum(tensor.numel() * 4 for tensor in tensors)
    available = available_host_bytes()
    if available is not None and needed + FLOAT32_COPY_RESERVE_BYTES > available:
        log.warning("a float32 copy of the model needs %.2f GiB, and the host has %.2f GiB available: decoding in "
                    "float64 alone (the same answers, more slowly)", needed / 2**30, available / 2**30)
        return None
    # The weights narrowed first and handed to deepcopy in its memo: the float64 weights are never duplicated, so the
    # copy costs the float32 weights alone (half the float64 model), where a plain deepcopy first held all of it.
    memo: dict[int, Any] = {id(tensor): _narrowed(tensor) for tensor in tensors}
    return copy.deepcopy(model, memo).eval()


# What the host keeps free beside a float32 copy: the decoding's activations and KV cache, and the rest of the system.
FLOAT32_COPY_RESERVE_BYTES = 2**30


def _narrowed(tensor: torch.Tensor) -> torch.Tensor:
    narrowed = tensor.detach().to(torch.float32)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(narrowed, requires_grad=tensor.requires_grad)
    return narrowed


def available_host_bytes() -> int | None:
    """The host memory available for new allocations (Linux's MemAvailable: free memory plus what the page cache
    can give back); None where /proc/meminfo does not say, and the copy is made unguarded."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


FLOAT32_DECODING = (f"a float32 copy of the weights decodes; where its two best logits are under {NEAR_TIE_MARGIN} "
                    "apart, the row's sequence runs through the float64 model, whose argmax decides")


def describe_cuda_path(plan_compute_dtype: torch.dtype, weights: str) -> dict[str, Any]:
    """The numeric path of CUDA generation (unchanged: bitsandbytes 4-bit or dequantized weights, bf16/fp16)."""
    return {"device": "cuda", "compute_dtype": str(plan_compute_dtype).removeprefix("torch."), "weights": weights,
            "kernel_path": "bitsandbytes CUDA 4-bit kernels" if weights == "nf4" else "torch CUDA F.linear"}


def base_weights_fingerprint(source: str) -> dict[str, str]:
    """sha256 of the files a local base model's answers depend on (the converted embedded model is a local
    directory), so two machines' results can be traced to the same weights; a hub id is recorded by name (its
    snapshot is already content-addressed by the hub's commit)."""
    directory = Path(source)
    if not directory.is_dir():
        return {"hub_id": source}
    files = sorted({path for pattern in WEIGHT_FILE_PATTERNS for path in directory.glob(pattern) if path.is_file()})
    return {path.name: sha256_file(path) for path in files}
