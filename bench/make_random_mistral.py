"""Build a random-init Mistral-7B-shaped model (support.mistral.MISTRAL_7B_SHAPE, 7.24B params) with the real Mistral
tokenizer and save it as a model directory: the stand-in for Mistral-7B-Instruct-v0.2 where no weights can reach.

    python -m bench.make_random_mistral /tmp/mistral-7b-random [--layers N]

Initialised on the GPU when there is one (seconds), saved in bf16 (14.5 GB at full size).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from transformers import MistralForCausalLM

from alpaca_qlora.stage import configure_logging
from support.mistral import mistral_7b_config, mistral_tokenizer

log = logging.getLogger("make_random_mistral")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check (default: 32)")
    arguments = parser.parse_args()
    configure_logging()
    started = time.perf_counter()
    tokenizer = mistral_tokenizer()
    overrides = {"num_hidden_layers": arguments.layers} if arguments.layers else {}
    config = mistral_7b_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, **overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(arguments.out_dir), max_shard_size="5GB")
    tokenizer.save_pretrained(str(arguments.out_dir))
    log.info("%.2fB params saved to %s in %.0f s", params / 1e9, arguments.out_dir, time.perf_counter() - started)


if __name__ == "__main__":
    main()
