"""Test and bench support, outside the alpaca_qlora package (not installed with it): the profiles as params with a
test's own keys (params.py), and a random-init Mistral with Mistral-7B's real tokenizer, at test size for tests/ or
at the 7B shape for bench/ (mistral.py).

Imported from the project root: `python -m pytest` and `python -m bench.<script>` put it on sys.path.
"""
