"""Settings from flags and MHA_* variables; CPU threads from (fake) cgroup files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mha.service.core import devices
from mha.service.core.errors import StartupError
from mha.service.core.settings import SPECS, Settings, add_arguments, from_sources


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_match_the_documented_table():
    settings = from_sources(parse(), {})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert settings.repository == Path("models") and settings.device == "auto"
    assert settings.max_message_bytes == 64 * 2**20 and settings.grace_seconds == 10
    assert settings.reflection and settings.batching and not settings.no_compute


def test_flag_beats_environment_beats_default():
    env = {"MHA_PORT": "9001", "MHA_THREADS": "3", "MHA_BATCHING": "off", "MHA_LOG_FORMAT": "json"}
    settings = from_sources(parse("--port", "9002", "--batching"), env)
    assert settings.port == 9002  # flag
    assert settings.threads == 3 and settings.log_format == "json"  # environment
    assert settings.batching  # --batching beats MHA_BATCHING=off
    assert from_sources(parse("--no-reflection"), {}).reflection is False


def test_every_setting_has_a_flag_and_a_variable():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for spec in SPECS:
        assert spec.flag in flags and spec.env == "MHA_" + spec.field.upper()


def test_metrics_port_off_zero_and_number():
    assert from_sources(parse("--metrics-port", "off"), {}).metrics_port is None
    assert from_sources(parse(), {"MHA_METRICS_PORT": "off"}).metrics_port is None
    assert from_sources(parse("--metrics-port", "0"), {}).metrics_port == 0
    assert from_sources(parse(), {"MHA_METRICS_PORT": "9102"}).metrics_port == 9102


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MHA_PORT": "eighty"}, "MHA_PORT='eighty': invalid literal for int()"),
        ({"MHA_DEVICE": "tpu"}, "MHA_DEVICE='tpu': choose from auto, cpu, cuda"),
        ({"MHA_BATCHING": "maybe"}, "MHA_BATCHING='maybe': expected a boolean"),
        ({"MHA_THREADS": "0"}, "threads must be >= 1, got 0"),
        ({"MHA_GRACE_SECONDS": "-1"}, "grace_seconds must be >= 0, got -1.0"),
        ({"MHA_PORT": "70000"}, "port must be in 0..65535, got 70000"),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_sources(parse(), env)


def cgroup(root: Path, **files: str) -> Path:
    for name, text in files.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "cores", "threads"),
    [
        ({"cpu.max": "200000 100000\n"}, 64, 2),  # v2: 2 CPUs on a 64-core host
        ({"cpu.max": "150000 100000\n"}, 64, 2),  # 1.5 CPUs round up
        ({"cpu.max": "50000 100000\n"}, 64, 1),  # never below 1
        ({"cpu.max": "max 100000\n"}, 8, 8),  # unlimited: the cores
        ({"cpu.max": "800000 100000\n"}, 4, 4),  # quota above the cores: the cores
        ({"cpu__cpu.cfs_quota_us": "300000", "cpu__cpu.cfs_period_us": "100000"}, 64, 3),  # v1
        ({"cpu__cpu.cfs_quota_us": "-1", "cpu__cpu.cfs_period_us": "100000"}, 6, 6),  # v1 none
        ({}, 5, 5),  # no cgroup files at all
    ],
)
def test_threads_from_the_cgroup_quota(tmp_path, files, cores, threads):
    root = cgroup(tmp_path, **files)
    assert devices.default_threads(root, cpu_count=cores) == threads


def test_device_plans():
    assert devices.plan("cpu", [devices.CUDA, devices.CPU]).providers == (devices.CPU,)
    auto_gpu = devices.plan("auto", [devices.CUDA, devices.CPU])
    assert auto_gpu.providers == (devices.CUDA, devices.CPU) and not auto_gpu.strict
    assert auto_gpu.options[0]["use_tf32"] == 0
    assert devices.plan("cuda", [devices.CUDA, devices.CPU]).strict
    assert devices.plan("auto", [devices.CPU]).providers == (devices.CPU,)
    with pytest.raises(StartupError, match="--device cuda: ONNX Runtime has no CUDAExec"):
        devices.plan("cuda", [devices.CPU])


def test_silent_fallback_is_caught():
    strict = devices.plan("cuda", [devices.CUDA, devices.CPU])
    with pytest.raises(StartupError, match="asked ONNX Runtime for CUDAExecutionProvider"):
        devices.check_session_providers(strict, [devices.CPU], "m/1")
    lenient = devices.plan("auto", [devices.CUDA, devices.CPU])
    assert devices.check_session_providers(lenient, [devices.CPU], "m/1") == devices.CPU
    assert devices.check_session_providers(strict, [devices.CUDA, devices.CPU], "m/1") == (
        devices.CUDA
    )


def test_no_compute_is_a_plain_switch():
    assert from_sources(parse("--no-compute"), {}).no_compute is True
    assert from_sources(parse(), {"MHA_NO_COMPUTE": "1"}).no_compute is True
    assert from_sources(parse(), {}).no_compute is False


def test_grpc_options_carry_limits_and_connection_age():
    from mha.service.grpc.server import grpc_options

    options = dict(grpc_options(Settings(max_message_bytes=1000)))
    assert options["grpc.max_receive_message_length"] == 1000
    assert options["grpc.max_send_message_length"] == 1000
    assert "grpc.max_connection_age_ms" not in options  # 0 = off
    aged = dict(
        grpc_options(Settings(max_connection_age_seconds=300, max_connection_age_grace_seconds=30))
    )
    assert aged["grpc.max_connection_age_ms"] == 300_000
    assert aged["grpc.max_connection_age_grace_ms"] == 30_000
    assert "grpc.max_concurrent_streams" not in options  # 0 = gRPC's default, unlimited
    streams = dict(grpc_options(Settings(max_concurrent_streams=64)))
    assert streams["grpc.max_concurrent_streams"] == 64


def test_padding_cap_defaults_by_device():
    from mha.service.core.models import padding_for

    assert padding_for("CPUExecutionProvider") == 0.0  # padding is pure loss on CPU
    assert padding_for("CUDAExecutionProvider") == 0.25
    assert Settings().max_padding_fraction is None  # unset: chosen per device at load
