"""Tiny random-init models of the families users fine-tune (Llama 3, Qwen2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3),
each from transformers' own config class for that architecture and with the family's tokenizer
(support/family_tokenizers.py: the real one where a package ships it), so a test runs the family's real modelling
and tokenization code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from support.family_tokenizers import copy_tokenizer

# family -> transformers' config class name for it (Qwen2.5 is the qwen2 architecture, Llama 3 the llama one).
FAMILY_CONFIGS = {
    "llama3": "LlamaConfig",
    "qwen2.5": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3-text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
}
# Test size. head_dim is given because Qwen3's and Gemma's configs default it to the real models' 128 or 256 rather
# than hidden_size / heads; the configs without the argument (Qwen2, Phi-3) derive the same 16.
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
# Gemma's windows at test size: shorter than the tests' prompts, so a path that ignored the window would show.
TINY_SLIDING_WINDOW = {"gemma2": 32, "gemma3-text": 32}
# What each family's linear layers are called: Phi-3 fuses q, k, v into one projection, and gate with up.
FAMILY_LINEAR_NAMES = {family: ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
                       for family in FAMILY_CONFIGS}
FAMILY_LINEAR_NAMES["phi3"] = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def family_config(family: str, tokenizer: Any) -> Any:
    """The family's config at TINY_SHAPE, with the tokenizer's vocabulary and special ids (pad: its own or its
    unknown token, as alpaca_qlora.models.loading picks it)."""
    import transformers

    config_class = getattr(transformers, FAMILY_CONFIGS[family])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    window = {"sliding_window": TINY_SLIDING_WINDOW[family]} if family in TINY_SLIDING_WINDOW else {}
    return config_class(**TINY_SHAPE, **window, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)


def build_tiny_family(family: str, out_dir: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-init model of `family` saved in `out_dir` beside the tokenizer files of `tokenizer_dir`
    (support.family_tokenizers.save_family_tokenizer's), loadable as `model.name` is.

    The config is written first and the tokenizer read back from the folder, as the pipeline will read it:
    transformers 5 may pick the tokenizer class by model type, and the embedding must hold every id it then has."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = copy_tokenizer(tokenizer_dir, out_dir)
    family_config(family, AutoTokenizer.from_pretrained(str(out_dir))).save_pretrained(str(out_dir))
    config = family_config(family, AutoTokenizer.from_pretrained(str(out_dir)))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out_dir))
    return out_dir
