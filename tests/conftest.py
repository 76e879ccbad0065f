"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the test extra installs it, for compiling to TPU topologies) takes a machine-wide lock per process unless
# told otherwise; xdist workers and the tests' subprocesses compile concurrently.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
