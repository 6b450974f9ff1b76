"""Test-wide setup: 8 simulated CPU devices (set before jax is imported) and CPU-only JAX.

libtpu is installed by the tpu-aot extra for ahead-of-time TPU compilation; tests run on the CPU
backend, and the AOT tests ask for TPU topologies explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import tracealign_jax  # noqa: E402,F401  (its XLA CPU defaults, platform_env, before jax starts)

# The per-user cache of verified artifacts (atomic_io.verify_manifest_cached) goes to a per-run temp dir,
# so tests neither read a developer's cache nor leave entries in it.
import tempfile  # noqa: E402

os.environ.setdefault("TRACEALIGN_CACHE_DIR", tempfile.mkdtemp(prefix="tracealign-test-cache-"))
