"""Mistral-7B-Instruct-v0.2's tokenizer rebuilt from mistral-common's sentencepiece model, and random-init Mistral
models that use it: the real tokenizer and code path where no Mistral weights can reach (tests, the GPU bench).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.embedded import package_dir

MISTRAL_TOKENIZER_FILE = "tokenizer.model.v1"  # in mistral_common/data: Mistral-7B(-Instruct-v0.2)'s tokenizer
MISTRAL_CONTEXT_LENGTH = 32768  # Mistral-7B-Instruct-v0.2's max_position_embeddings
# Mistral's v1 instruct format exactly as mistral-common encodes it (the reference): the system prompt joins the first
# user turn, each turn is "[INST] ... [/INST]", an answer is " answer</s>". With the sentencepiece-style normalizer
# (a "▁" before every text segment) this renders to mistral-common's token ids.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Mistral-7B's shape (7.24B params with the 32000-id vocabulary), stated here rather than read off MistralConfig's
# defaults, which a transformers release may change.
MISTRAL_7B_SHAPE = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000}


def mistral_tokenizer_model_path() -> Path:
    """mistral-common's tokenizer.model.v1, or the file named by ALPACA_QLORA_MISTRAL_TOKENIZER where the package
    can't be installed (on a GPU image, an installed mistral-common without pydantic breaks AutoTokenizer)."""
    if os.environ.get("ALPACA_QLORA_MISTRAL_TOKENIZER"):
        return Path(os.environ["ALPACA_QLORA_MISTRAL_TOKENIZER"])
    path = package_dir("mistral_common", "run `make setup`.") / "data" / MISTRAL_TOKENIZER_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing: this mistral-common release does not ship {MISTRAL_TOKENIZER_FILE}; "
                            f"install the pinned one (`make setup`).")
    return path


def sentencepiece_bpe(model_file: Path) -> Any:
    """A `tokenizers` BPE with sentencepiece's vocabulary and merge priority (ids identical to sentencepiece's).

    Sentencepiece merges the pair whose result scores highest; HF BPE merges by rank, so merges are ranked by the
    merged piece's score. transformers 5's own conversion ranks by id instead, which puts "▁▁" (score -1e9) first
    and encodes " leading" as "▁▁"+"leading" where sentencepiece gives "▁"+"▁leading".
    """
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(index): index for index in range(processor.get_piece_size())}
    ranked = []
    for piece, index in vocab.items():
        if processor.is_control(index) or processor.is_unknown(index) or processor.is_byte(index):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-processor.get_score(index), index, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = processor.id_to_piece(processor.unk_id())
    bos = processor.id_to_piece(processor.bos_id())
    eos = processor.id_to_piece(processor.eos_id())
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (unk, bos, eos)])
    # add_dummy_prefix and whitespace as "▁", as Mistral's tokenizer.json does (no pre-tokenizer).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, processor.bos_id())])
    return backend


def mistral_tokenizer() -> Any:
    """Mistral-7B-Instruct-v0.2's tokenizer (sentencepiece v1, 32000 ids) from mistral-common, as a HF tokenizer.

    Built like the hub's tokenizer.json and saved as a plain tokenizers backend, which loads tokenizer.json as
    written: transformers 5's LlamaTokenizer would swap in a Metaspace pre-tokenizer that drops a leading space
    (" hi" encodes like "hi"), unlike the sentencepiece model Mistral was trained with. Adds BOS, never EOS.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_bpe(mistral_tokenizer_model_path()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True, add_eos_token=False,
        clean_up_tokenization_spaces=False, model_max_length=MISTRAL_CONTEXT_LENGTH,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def mistral_7b_config(**overrides: Any) -> Any:
    """A MistralConfig of the 7B shape, with `overrides` on top (fewer layers, the tokenizer's special ids)."""
    from transformers import MistralConfig

    return MistralConfig(**{**MISTRAL_7B_SHAPE, **overrides})


def build_tiny_mistral(out_dir: str | Path, *, num_hidden_layers: int = 2, hidden_size: int = 64,
                       intermediate_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random-init Mistral with the real tokenizer: the real code path at test size (or 7B-shaped if asked)."""
    from transformers import MistralForCausalLM

    out_dir = Path(out_dir)
    tokenizer = mistral_tokenizer()
    config = mistral_7b_config(
        num_hidden_layers=num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(dtype)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
