"""Test set-up: 8 fake CPU devices (for sharding tests) and strict rank promotion.

XLA_FLAGS must be set before jax is imported, which is why it happens here.
"""

import os
import sys

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' one persistent compilation cache (procs.compilation_cache), for this process
# and every run it starts: many tests compile the same programs of the same tiny models.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import compilation_cache  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = compilation_cache()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the small programs too

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
