"""Numbers a run could never use are refused when params are read, naming the key, before any model loads."""
from __future__ import annotations

import pytest

from alpaca_qlora.errors import ConfigError
from support.params import embedded_params


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "max_steps", "nan"), ("train", "max_steps", "inf"), ("train", "max_steps", float("nan")),
    ("train", "epochs", "inf"), ("train", "epochs", "nan"), ("train", "learning_rate", "nan"),
    ("train", "max_grad_norm", "inf"), ("lora", "dropout", "nan"), ("data", "sample_frac", "nan"),
    ("lora", "r", "inf"),
])
def test_a_non_finite_number_is_refused_naming_its_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key} = .* finite"):
        embedded_params(**{section: {key: value}})


@pytest.mark.parametrize("value", ["1e38", 2.0])
def test_a_learning_rate_beyond_any_usable_one_is_refused(value):
    with pytest.raises(ConfigError, match=r"train\.learning_rate = .* at most 1"):
        embedded_params(train={"learning_rate": value})


def test_usual_learning_rates_stay_accepted():
    assert embedded_params(train={"learning_rate": "2e-4"}).train.learning_rate == 2e-4
    assert embedded_params(train={"learning_rate": 1.0}).train.learning_rate == 1.0
