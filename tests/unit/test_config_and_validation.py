"""Config from the environment and request validation against a model spec."""

from __future__ import annotations

import numpy as np
import pytest

from services.router.config import RouterConfig
from shared.config import ConfigError, from_env
from shared.errors import InvalidArgument
from shared.events import ModelSpec, TensorSpec
from shared.validation import check_inputs

SPEC = ModelSpec(
    name="m",
    backend="echo",
    inputs=(TensorSpec(name="INPUT0", dtype="FP32", shape=(16,)),),
    accepts_text=False,
)


def test_config_reads_infermesh_variables_and_keeps_service_defaults() -> None:
    cfg = from_env(RouterConfig, {"INFERMESH_GRPC_HOST": "0.0.0.0", "INFERMESH_GRACE_S": "2.5"})
    assert cfg.grpc_host == "0.0.0.0"
    assert cfg.grace_s == 2.5
    assert cfg.grpc_port == 8001
    assert cfg.advertised(8001) == "127.0.0.1:8001"


def test_a_malformed_variable_is_named_in_the_error() -> None:
    with pytest.raises(ConfigError, match="INFERMESH_GRPC_PORT"):
        from_env(RouterConfig, {"INFERMESH_GRPC_PORT": "eighty"})


def test_inputs_matching_the_spec_pass_and_report_the_batch_rows() -> None:
    assert check_inputs(SPEC, {"INPUT0": np.zeros((3, 16), np.float32)}, []) == 3


@pytest.mark.parametrize(
    ("inputs", "texts", "message"),
    [
        ({"INPUT0": np.zeros((1, 16), np.int32)}, [], "must be FP32, got INT32"),
        ({"INPUT0": np.zeros((1, 8), np.float32)}, [], "dimension 1 must be 16, got 8"),
        ({"INPUT0": np.zeros(16, np.float32)}, [], r"shape \[batch, 16\]"),
        ({"OTHER": np.zeros((1, 16), np.float32)}, [], "has no input 'OTHER'"),
        ({"INPUT0": np.zeros((0, 16), np.float32)}, [], "empty batch"),
        ({}, ["hi"], "does not accept text"),
        ({}, [], "neither inputs nor texts"),
    ],
)
def test_bad_inputs_are_rejected_saying_what_was_wrong(
    inputs: dict[str, np.ndarray], texts: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_inputs(SPEC, inputs, texts)


def test_tracing_interceptors_follow_the_exporter_unless_set_explicitly() -> None:
    auto = from_env(RouterConfig, {})
    assert not auto.tracing_enabled({})
    assert auto.tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert from_env(RouterConfig, {"INFERMESH_TRACING": "true"}).tracing_enabled({})
    off = from_env(RouterConfig, {"INFERMESH_TRACING": "false"})
    assert not off.tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
