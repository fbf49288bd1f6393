"""Test set-up: 8 fake CPU devices (for sharding tests) and strict rank promotion.

XLA_FLAGS must be set before jax is imported, which is why it happens here.
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    from procs import make_tokenizer

    return make_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tokenizer_path):
    from procs import make_reference_run

    return make_reference_run(tmp_path_factory, tokenizer_path)
