#!/usr/bin/env bash
# Pack Unsloth for the lent GPU machine (no network there; 64 MiB carried per call): unsloth and unsloth_zoo, plus
# the dependencies its image lacks, installed for Python 3.12 / manylinux into one folder, Unsloth's studio/ web
# app and CLI dropped, then tarred into .whl/unsloth-site.tar.gz (~12 MB). bench/gpu_run.sh's `unsloth` phase
# unpacks it onto PYTHONPATH for bench/unsloth_bench.py only (Unsloth patches transformers when imported).
#   bash bench/make_unsloth_site.sh [UNSLOTH_VERSION]
set -euo pipefail
version=${1:-2026.10.9}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/wheels" \
  "unsloth==$version" "unsloth_zoo==$version" tyro cut_cross_entropy torchao msgspec json5 nest_asyncio shtab \
  docstring_parser typeguard hf_transfer
python -m pip install -q --no-deps --no-compile --target "$work/site" --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 "$work"/wheels/*.whl
rm -rf "$work/site/studio" "$work/site/unsloth_cli" "$work/site/bin" "$work/site/test"
mkdir -p .whl
tar czf .whl/unsloth-site.tar.gz -C "$work/site" .
du -h .whl/unsloth-site.tar.gz
