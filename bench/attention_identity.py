"""Does sdpa give bitwise the same decode attention over a cache of exactly L keys (what generate()'s dynamic cache
passes) as over a longer static cache whose tail is masked out (what the graphed loop passes)? Per backend.

    python -m bench.attention_identity --out bench/results/attention_identity_h200.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import command_line


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def compare(length: int, slots: int, backend: SDPBackend | None, seed: int = 0) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    batch, heads, kv_heads, dim = 128, 32, 8, 128
    query = torch.randn(batch, heads, 1, dim, device="cuda", generator=generator).bfloat16()
    keys = torch.zeros(batch, kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    keys[:, :, :length] = torch.randn(batch, kv_heads, length, dim, device="cuda", generator=generator).bfloat16()
    values[:, :, :length] = torch.randn(batch, kv_heads, length, dim, device="cuda", generator=generator).bfloat16()
    padding = torch.randint(0, length // 2, (batch,), device="cuda", generator=generator)
    mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device="cuda")
    positions = torch.arange(slots, device="cuda")
    mask[:, 0, 0] = (positions[None] >= padding[:, None]) & (positions[None] < length)
    context = sdpa_kernel([backend]) if backend is not None else torch.autocast("cuda", enabled=False)
    with context:
        dynamic = F.scaled_dot_product_attention(query, repeat_kv(keys[:, :, :length], 4),
                                                 repeat_kv(values[:, :, :length], 4), attn_mask=mask[..., :length])
        static = F.scaled_dot_product_attention(query, repeat_kv(keys, 4), repeat_kv(values, 4), attn_mask=mask)
    return {"length": length, "slots": slots, "backend": backend.name if backend is not None else "default",
            "bitwise_equal": bool(torch.equal(dynamic, static)),
            "max_abs_diff": float((dynamic.float() - static.float()).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    rows = []
    for backend in (None, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION):
        for length, slots in ((200, 328), (217, 328), (256, 384), (300, 328), (327, 328)):
            try:
                rows.append(compare(length, slots, backend))
            except RuntimeError as error:
                rows.append({"length": length, "slots": slots, "backend": backend.name, "error": str(error)[:200]})
    arguments.out.write_text(json.dumps({"command": command_line(), "torch": torch.__version__,
                                         "device": torch.cuda.get_device_name(0), "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
