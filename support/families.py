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
# The profile each family runs with (profiles/<name>.yaml): the one place that pairs them. Qwen3 and Gemma 3 have no
# profile of their own and take their predecessor's (the same seven targets, the same settings).
FAMILY_PROFILE = {"llama3": "llama-3.1-8b", "qwen2.5": "qwen2.5-7b", "qwen3": "qwen2.5-7b", "gemma2": "gemma-2-9b",
                  "gemma3-text": "gemma-2-9b", "phi3": "phi-3.5-mini"}
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


# The released models' shapes, for the GPU bench's random-init stand-ins (config kwargs over the class defaults, which
# hold the rest: Phi-3's and Gemma's rotary base, Gemma's norms). Rotary scaling is left out (Llama 3.1's `llama3`
# rope type, Phi-3.5's longrope, whose long context is why its max_position_embeddings stays at the 4096 it was
# trained at, Gemma 3's linear factor): it changes no shape and no step's cost at 2048 tokens. transformers 5 takes the
# rotary base as rope_parameters, not rope_theta.
FAMILY_FULL_SHAPES: dict[str, dict[str, Any]] = {
    "llama3": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False},  # Llama-3.1-8B
    "qwen2.5": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False},  # Qwen2.5-7B
    "qwen3": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False},  # Qwen3-8B
    "gemma2": {"hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
               "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "max_position_embeddings": 8192, "tie_word_embeddings": True},  # Gemma-2-9B
    "gemma3-text": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208,
                    "sliding_window": 1024, "query_pre_attn_scalar": 256, "max_position_embeddings": 131072,
                    "tie_word_embeddings": True},  # Gemma-3-12B's text model
    "phi3": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
             "tie_word_embeddings": False},  # Phi-3.5-mini (3.8B)
}


def full_family_config(family: str, tokenizer: Any, **overrides: Any) -> Any:
    """The family's released shape (FAMILY_FULL_SHAPES, then `overrides` such as fewer layers) with the tokenizer's
    special ids, as the released config.json pairs them. The vocabulary holds every id the tokenizer has, since a
    stand-in tokenizer may be larger than the release's (Gemma 2's takes Gemma 3's 262,144 ids)."""
    import transformers

    shape = {**FAMILY_FULL_SHAPES[family], **overrides}
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    return getattr(transformers, FAMILY_CONFIGS[family])(**shape, bos_token_id=tokenizer.bos_token_id,
                                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
