"""lightflax.xla_defaults: pure flag merging (the process's own XLA_FLAGS are not touched)."""

import pytest

from lightflax import xla_defaults

FLAG = "xla_cpu_experimental_ynn_fusion_type"
TESTED = xla_defaults.TESTED_JAXLIB[0]


def test_defaults_appended_when_absent():
    out = xla_defaults.merged_flags("--xla_force_host_platform_device_count=2", TESTED)
    assert out.split() == ["--xla_force_host_platform_device_count=2", f"--{FLAG}={xla_defaults.CPU_FLAGS[FLAG]}"]
    assert xla_defaults.merged_flags("", TESTED) == f"--{FLAG}={xla_defaults.CPU_FLAGS[FLAG]}"


def test_user_flag_wins():
    user = f"--{FLAG}=dot --xla_cpu_use_onednn=true"
    assert xla_defaults.merged_flags(user, TESTED) == user


@pytest.mark.parametrize("version", [None, (0, 4, 35), (0, 10, 1), xla_defaults.TESTED_JAXLIB[1], (1, 0, 0)])
def test_untested_jaxlib_left_alone(version):
    assert xla_defaults.merged_flags("--a=1", version) == "--a=1"


def test_apply_switch_and_environ():
    env = {"XLA_FLAGS": "--a=1"}
    merged = xla_defaults.apply(env)
    assert env["XLA_FLAGS"] == merged
    off = {"XLA_FLAGS": "--a=1", xla_defaults.ENV_SWITCH: "0"}
    assert xla_defaults.apply(off) == "--a=1" and off["XLA_FLAGS"] == "--a=1"


def test_version_parsing():
    assert xla_defaults._version_tuple("0.10.2") == (0, 10, 2)
    assert xla_defaults._version_tuple("0.10.2.dev20260101") == (0, 10, 2)
    assert xla_defaults._version_tuple("garbage") is None
