"""The one error type a user meets: a stage prints its message and exits, and a config error is one of them."""
from __future__ import annotations

from alpaca_qlora.errors import ConfigError, PipelineError


def test_a_config_error_is_a_pipeline_error_and_a_value_error():
    """Stages exit on it with its message (tests/test_stage.py); validation code may catch it as a ValueError."""
    assert issubclass(ConfigError, PipelineError) and issubclass(ConfigError, ValueError)
    assert not issubclass(PipelineError, ValueError)  # a pipeline error is not always a bad value
