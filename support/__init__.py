"""Test and bench support, outside the alpaca_qlora package (not installed with it): a random-init Mistral with
Mistral-7B's real tokenizer, at test size for tests/ or at the 7B shape for bench/.

Imported from the project root: `python -m pytest` and `python -m bench.<script>` put it on sys.path.
"""
