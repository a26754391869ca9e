"""QLoRA training on the format stage's ids and labels: data, model, offload, distributed launch, the Trainer run,
checkpoints and tracking, one module each. Import from the modules; this file stays empty so a stage's deps are
the modules it uses."""
