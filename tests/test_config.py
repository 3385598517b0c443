"""Config validation and the one-way variant naming."""

from __future__ import annotations

import pytest

from quantpress.config import CalibrationConfig, Method, QuantConfig, variant_name
from quantpress.errors import ConfigError


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5}, "bits must be one of"),
    ({"group_size": 0}, "group_size must be -1 or positive"),
    ({"damp_percent": 0.0}, "damp_percent must be in"),
    ({"damp_percent": 1.0}, "damp_percent must be in"),
    ({"block_size": 0}, "block_size must be positive"),
    ({"method": "awq"}, "'awq' is not a valid Method"),
    ({"method": Method.RTN, "act_order": True}, "RTN does not compute"),
])
def test_invalid_quant_config(kwargs, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        QuantConfig(**kwargs)


def test_invalid_calibration_config():
    with pytest.raises(ConfigError, match="nsamples must be positive"):
        CalibrationConfig(nsamples=0)
    with pytest.raises(ConfigError, match="seqlen must be at least 2"):
        CalibrationConfig(seqlen=1)


@pytest.mark.parametrize("quant, name", [
    (QuantConfig(), "gptq-4bit-128g-actorder_False"),
    (QuantConfig(bits=3, group_size=-1, act_order=True), "gptq-3bit--1g-actorder_True"),
    (QuantConfig(bits=8, group_size=32, sym=False), "gptq-8bit-32g-actorder_False-asym"),
    (QuantConfig(bits=2, group_size=64, method="rtn"), "rtn-2bit-64g-actorder_False"),
])
def test_variant_name(quant, name):
    assert variant_name(quant) == name
    assert quant.method in (Method.GPTQ, Method.RTN)
