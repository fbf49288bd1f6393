"""Input pipelines (Grain) for every stage; see pipeline.py for the batch layout."""

from llama_jax.data.pipeline import LM_FEATURES, Batches, lm_example  # noqa: F401
from llama_jax.data.sources import DataError  # noqa: F401
