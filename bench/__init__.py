"""GPU measurements of the project's code paths; run from the project root as modules (`python -m bench.train_bench`)
so they import each other, alpaca_qlora and support/ without editing sys.path."""
