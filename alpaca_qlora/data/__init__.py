"""The data job, fetch to format: sources, row validation, the seeded split, prompt templates, tokenization and
masking, and the bundled Alpaca-format set. Import from the modules; this file stays empty so a stage's deps are
the modules it uses."""
