"""Random-init stand-ins for each family's released model (support.families.FAMILY_FULL_SHAPES) with the family's
tokenizer, for the GPU bench where no weights can reach; and the tokenizers packed for carrying there.

    python -m bench.make_random_family --pack-tokenizers .family-tokenizers                  # here (`make setup`)
    python -m bench.make_random_family FAMILY /tmp/tokenizer-FAMILY --unpack-from .family-tokenizers  # on the GPU
    python -m bench.make_random_family FAMILY OUT_DIR --tokenizer-dir /tmp/tokenizer-FAMILY [--layers N]

The GPU machine has none of the packages the tokenizers come from (support/family_tokenizers.py), and a call carries
at most 64 MiB, so --pack-tokenizers writes each family's tokenizer files gzip-compressed (Gemma 2 shares Gemma 3's:
SHARED_TOKENIZER) and --unpack-from writes one family's back as plain files. The model is initialised on the GPU
when there is one (else the CPU), in bf16, built in OUT_DIR.partial and renamed to OUT_DIR once saved, so an
existing OUT_DIR is always whole.
"""
from __future__ import annotations

import argparse
import gzip
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_qlora.stage import configure_logging
from support.families import FAMILY_FULL_SHAPES, full_family_config
from support.family_tokenizers import copy_tokenizer, save_family_tokenizer

log = logging.getLogger("make_random_family")
# family -> the family whose packed tokenizer it takes (stored once: Gemma 2's stand-in is Gemma 3's, 33 MB)
SHARED_TOKENIZER = {"gemma2": "gemma3-text"}


def gzip_file(source: Path, target: Path) -> None:
    """One file gzip-compressed: the tokenizer.json files shrink about sixfold, which keeps the carry under its cap."""
    with source.open("rb") as plain, gzip.open(target, "wb") as packed:
        shutil.copyfileobj(plain, packed)


def pack_tokenizers(out_dir: Path) -> None:
    """Every family's tokenizer (save_family_tokenizer, which needs this machine's packages), each file
    gzip-compressed, in out_dir/<family>/; a family in SHARED_TOKENIZER is not stored again."""
    for family in FAMILY_FULL_SHAPES:
        if family in SHARED_TOKENIZER:
            continue
        (out_dir / family).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            for path in save_family_tokenizer(family, scratch).iterdir():
                gzip_file(path, out_dir / family / f"{path.name}.gz")
        log.info("packed %s's tokenizer in %s", family, out_dir / family)


def unpack_tokenizer(packed_root: Path, family: str, out_dir: Path) -> Path:
    """`family`'s packed tokenizer decompressed into out_dir, as AutoTokenizer reads a folder; refuses a family
    that was never packed rather than leave an empty folder for the build to fail on later."""
    source = packed_root / SHARED_TOKENIZER.get(family, family)
    packed = sorted(source.glob("*.gz"))
    if not packed:
        raise FileNotFoundError(f"no packed tokenizer in {source}: run --pack-tokenizers {packed_root} where "
                                "the tokenizer packages are installed")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in packed:
        with gzip.open(path, "rb") as compressed, (out_dir / path.name.removesuffix(".gz")).open("wb") as plain:
            shutil.copyfileobj(compressed, plain)
    log.info("%s's tokenizer unpacked to %s", family, out_dir)
    return out_dir


def random_model(config: Any) -> Any:
    """The model at random init in bf16, created on the GPU when there is one: seconds there for 8B parameters,
    where the CPU takes minutes."""
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def build(family: str, out_dir: Path, tokenizer_dir: Path, layers: int | None) -> None:
    """The tokenizer files copied in, the released shape's config with that tokenizer's ids, the weights saved; all
    in a `.partial` folder renamed at the end, so a killed build leaves no folder that looks whole."""
    started = time.perf_counter()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    copy_tokenizer(tokenizer_dir, partial)
    overrides = {"num_hidden_layers": layers} if layers else {}
    config = full_family_config(family, AutoTokenizer.from_pretrained(str(partial)), **overrides)
    model = random_model(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(partial), max_shard_size="5GB")
    partial.rename(out_dir)
    log.info("%s: %.2fB params (%s) saved to %s in %.0f s", family, params / 1e9, type(model).__name__, out_dir,
             time.perf_counter() - started)


def parse_arguments() -> argparse.Namespace:
    """Three uses, one script: pack (here), unpack and build (on the GPU machine)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", nargs="?", choices=sorted(FAMILY_FULL_SHAPES))
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--tokenizer-dir", type=Path, help="the family's tokenizer folder (plain files)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--unpack-from", type=Path, metavar="PACKED_DIR",
                        help="write FAMILY's tokenizer from this --pack-tokenizers folder to OUT_DIR and exit")
    parser.add_argument("--pack-tokenizers", type=Path, metavar="DIR", help="write the packed tokenizers and exit")
    arguments = parser.parse_args()
    if not arguments.pack_tokenizers and not (arguments.family and arguments.out_dir):
        parser.error("give FAMILY OUT_DIR (with --tokenizer-dir or --unpack-from), or --pack-tokenizers DIR")
    if arguments.family and not (arguments.unpack_from or arguments.tokenizer_dir):
        parser.error("building needs --tokenizer-dir (a folder --unpack-from wrote)")
    return arguments


def main() -> None:
    """Pack, unpack or build, as the arguments say."""
    arguments = parse_arguments()
    configure_logging()
    if arguments.pack_tokenizers:
        pack_tokenizers(arguments.pack_tokenizers)
    elif arguments.unpack_from:
        unpack_tokenizer(arguments.unpack_from, arguments.family, arguments.out_dir)
    else:
        build(arguments.family, arguments.out_dir, arguments.tokenizer_dir, arguments.layers)


if __name__ == "__main__":
    main()
