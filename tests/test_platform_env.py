"""Process defaults set before JAX starts: the XLA CPU flag that turns off YNNPACK fusions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tracealign_jax import platform_env


@pytest.mark.parametrize(("before", "version", "after"), [
    (None, "0.10.2", "--xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_force_host_platform_device_count=8", "0.10.2",
     "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_cpu_experimental_ynn_fusion_type=dot", "0.10.2", "--xla_cpu_experimental_ynn_fusion_type=dot"),  # the user's
    ("--xla_force_host_platform_device_count=8", "0.11.0", "--xla_force_host_platform_device_count=8"),  # not known to take it
])  # fmt: skip
def test_cpu_xla_defaults(monkeypatch, before, version, after):
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    monkeypatch.setattr(platform_env.metadata, "version", lambda name: version)
    platform_env.cpu_xla_defaults()
    assert os.environ.get("XLA_FLAGS", "") == after


def test_importing_the_package_sets_the_flag_before_jax_starts():
    """The installed jaxlib accepts the flag (an unknown XLA flag would abort the computation below)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "import os, tracealign_jax, jax; print(float(jax.numpy.arange(4.0) @ jax.numpy.arange(4.0))); print(os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "14.0"
    from importlib import metadata

    if metadata.version("jaxlib").startswith(platform_env.YNN_FLAG_JAXLIB):
        assert out[1] == "--xla_cpu_experimental_ynn_fusion_type="
