"""Loss functions for the one train step.

An objective is `objective(apply_fn, params, batch) -> (loss_sum, weight, metric_sums)`:
sums over the batch, not means, so that gradient accumulation over micro-batches is
exact (the step divides the accumulated `loss_sum` by the accumulated `weight`).
`metric_sums` maps names to sums that are divided by the same weight when logged.
`apply_fn(params, tokens, positions, segment_ids)` runs the model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Objective = Callable[[Callable, Any, dict], tuple[jax.Array, jax.Array, dict]]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32. logits [B, T, V], targets [B, T] -> [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token(apply_fn, params, batch) -> tuple[jax.Array, jax.Array, dict]:
    """Masked next-token cross-entropy (pretraining, SFT, rejection-sampled targets,
    GAtt): the batch's `loss_mask` says which targets are trained."""
    logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_cross_entropy(logits, batch["targets"])
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask), {"accuracy": jnp.sum(correct * mask)}


OBJECTIVES: dict[str, Objective] = {"next_token": next_token}
