"""Random-init stand-ins for each family's released model (support.families.FAMILY_FULL_SHAPES) with the family's
tokenizer, for the GPU bench where no weights can reach; and the tokenizers packed for carrying there.

    python -m bench.make_random_family --pack-tokenizers .family-tokenizers     # here (needs `make setup`)
    python -m bench.make_random_family FAMILY OUT_DIR --tokenizers .family-tokenizers [--layers N]   # on the GPU

The GPU machine has none of the packages the tokenizers come from, and a call carries at most 64 MiB, so
--pack-tokenizers writes each family's tokenizer files gzip-compressed (Gemma 2 shares Gemma 3's). The model is
initialised on the GPU when there is one, in bf16, and saved beside the unpacked tokenizer.
"""
from __future__ import annotations

import argparse
import gzip
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_qlora.stage import configure_logging
from support.families import FAMILY_FULL_SHAPES, full_family_config
from support.family_tokenizers import save_family_tokenizer

log = logging.getLogger("make_random_family")
SHARED_TOKENIZER = {"gemma2": "gemma3-text"}


def pack_tokenizers(out_dir: Path) -> None:
    """Every family's tokenizer folder, each file gzip-compressed, in out_dir/<family>/."""
    for family in FAMILY_FULL_SHAPES:
        if family in SHARED_TOKENIZER:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            for path in save_family_tokenizer(family, scratch).iterdir():
                (out_dir / family).mkdir(parents=True, exist_ok=True)
                with path.open("rb") as source, gzip.open(out_dir / family / f"{path.name}.gz", "wb") as packed:
                    shutil.copyfileobj(source, packed)
        log.info("packed %s's tokenizer", family)


def unpack_tokenizer(packed_root: Path, family: str, out_dir: Path) -> None:
    for path in (packed_root / SHARED_TOKENIZER.get(family, family)).glob("*.gz"):
        with gzip.open(path, "rb") as packed, (out_dir / path.name.removesuffix(".gz")).open("wb") as target:
            shutil.copyfileobj(packed, target)


def build(family: str, out_dir: Path, packed_root: Path, layers: int | None) -> None:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    unpack_tokenizer(packed_root, family, out_dir)
    overrides = {"num_hidden_layers": layers} if layers else {}
    config = full_family_config(family, AutoTokenizer.from_pretrained(str(out_dir)), **overrides)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out_dir), max_shard_size="5GB")
    log.info("%s: %.2fB params saved to %s in %.0f s", family, params / 1e9, out_dir, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", nargs="?", choices=sorted(FAMILY_FULL_SHAPES))
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--tokenizers", type=Path, default=Path(".family-tokenizers"),
                        help="the folder --pack-tokenizers wrote")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--pack-tokenizers", type=Path, metavar="DIR", help="write the packed tokenizers and exit")
    arguments = parser.parse_args()
    configure_logging()
    if arguments.pack_tokenizers:
        pack_tokenizers(arguments.pack_tokenizers)
    elif arguments.family and arguments.out_dir:
        build(arguments.family, arguments.out_dir, arguments.tokenizers, arguments.layers)
    else:
        parser.error("give FAMILY OUT_DIR, or --pack-tokenizers DIR")


if __name__ == "__main__":
    main()
