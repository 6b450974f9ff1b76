"""Test-wide setup: 8 simulated CPU devices (set before jax is imported) and CPU-only JAX.

libtpu is installed by the tpu-aot extra for ahead-of-time TPU compilation; tests run on the CPU
backend, and the AOT tests ask for TPU topologies explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
