"""Shared test helpers: fast random params (no init compile) and jitted apply."""

import functools

import jax
import numpy as np

from llama_jax.model import Llama
from llama_jax.sharding import abstract_params


def random_params(cfg, heads=("lm",), seed=0, std=0.02):
    """Params of Llama(cfg, heads) filled from NumPy: weights ~ N(0, std), norm scales
    ~ 1 + N(0, 0.1) (so a swapped norm shows), biases 0. Float32 host arrays."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        if name == "bias":
            return np.zeros(s.shape, np.float32)
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_params(Llama(cfg, heads)))


@functools.lru_cache(maxsize=None)
def _jitted(model):
    return jax.jit(model.apply)


def run(model, params, *args, **kwargs):
    """model.apply under jit (eager op-by-op dispatch is what makes CPU tests slow)."""
    return _jitted(model)({"params": params}, *args, **kwargs)
