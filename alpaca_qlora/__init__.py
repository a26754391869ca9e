"""Shared code for the QLoRA instruction-tuning pipeline: what more than one stage needs lives here once."""
