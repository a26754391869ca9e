"""Test and bench support, outside the alpaca_qlora package (not installed with it): the profiles as params with a
test's own keys (params.py), a random-init Mistral with Mistral-7B's real tokenizer, at test size for tests/ or
at the 7B shape for bench/ (mistral.py), tiny random-init models of the other families (families.py), a real-format
stand-in for alpaca-cleaned (alpaca_like.py), and what the tests of one subpackage share: a short training run on
the tiny model (training.py), prompts and a generate() runner (generation.py).

Imported from the project root: `python -m pytest` and `python -m bench.<script>` put it on sys.path.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The project root (params.yaml, dvc.yaml, stages/), wherever a test or bench file sits below it."""
