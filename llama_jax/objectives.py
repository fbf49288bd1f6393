"""Loss functions for the one train step.

An objective is `objective(apply_fn, params, batch, frozen=None) -> (loss_sum, weight,
metric_sums)`: sums over the batch, not means, so that gradient accumulation over
micro-batches is exact (the step divides the accumulated `loss_sum` by the accumulated
`weight`, and every metric sum by the same weight). `apply_fn(params, tokens, positions,
segment_ids)` runs the model; `frozen` holds parameters that are not trained (DPO's
reference policy), passed into the jitted step as an argument, never as constants.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Objective = Callable[..., tuple[jax.Array, jax.Array, dict]]


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum), int32, computed as
    two plain reductions: XLA:CPU runs argmax's (value, index) reduction over a 32000-word
    vocab several times slower (measured: 4 ms vs <1 ms for [16, 32000])."""
    V = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(idx, V - 1)  # an all-NaN row: stay in range


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32. logits [B, T, V], targets [B, T] -> [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token(apply_fn, params, batch, frozen=None) -> tuple[jax.Array, jax.Array, dict]:
    """Masked next-token cross-entropy (pretraining, SFT, rejection-sampled targets,
    GAtt): the batch's `loss_mask` says which targets are trained."""
    logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_cross_entropy(logits, batch["targets"])
    correct = (argmax(logits) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask), {"accuracy": jnp.sum(correct * mask)}


def _both_sides(batch: dict, field: str) -> jax.Array:
    """chosen_<field> and rejected_<field> stacked into one [2B, ...] array (one forward)."""
    return jnp.concatenate([batch[f"chosen_{field}"], batch[f"rejected_{field}"]], axis=0)


def answer_tokens(loss_mask: jax.Array) -> jax.Array:
    """The answer's own tokens (EOS included) from the next-token layout's loss mask,
    which marks the positions *predicting* them: the mask moved one step right."""
    return jnp.pad(loss_mask, ((0, 0), (1, 0)))[:, :-1]


def ranking(apply_fn, params, batch, frozen=None, safety_weight: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """Reward-model loss (paper eq. 2 with the margin of section 3.2.2):
        L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(rating)),
    with `batch["margin"]` = m(rating) from the chosen table (0 for `none`). With
    `safety_weight` > 0 (the safety reward model) an auxiliary binary cross-entropy pushes
    sigmoid(r) towards 1 for responses labelled safe and 0 for unsafe ones, on every
    response that has a label: the paper names this term (A.3.4) but gives no formula."""
    scores = apply_fn(params, _both_sides(batch, "tokens"), _both_sides(batch, "positions"),
                      _both_sides(batch, "segment_ids"),
                      score_mask=answer_tokens(_both_sides(batch, "loss_mask"))).astype(jnp.float32)
    B = batch["margin"].shape[0]
    pairs = real_pairs(batch)
    r_chosen, r_rejected = scores[:B], scores[B:]
    diff = r_chosen - r_rejected
    losses = jax.nn.softplus(-(diff - batch["margin"].astype(jnp.float32)))  # = -log sigmoid(.)
    loss_sum = jnp.sum(losses * pairs)
    metrics = {"accuracy": jnp.sum((diff > 0) * pairs), "reward_margin": jnp.sum(diff * pairs),
               "chosen_reward": jnp.sum(r_chosen * pairs), "rejected_reward": jnp.sum(r_rejected * pairs)}
    if safety_weight:
        labels = jnp.concatenate([batch["chosen_safe"], batch["rejected_safe"]]).astype(jnp.float32)
        known = (labels >= 0) * jnp.concatenate([pairs, pairs])
        bce = optax.sigmoid_binary_cross_entropy(scores, jnp.clip(labels, 0.0, 1.0))
        # Normalised per pair like the ranking term: each pair contributes its labelled responses.
        aux = jnp.sum(bce * known) / jnp.maximum(jnp.sum(known), 1.0) * jnp.sum(pairs)
        loss_sum = loss_sum + safety_weight * aux
        metrics["safety_bce"] = aux
    return loss_sum, jnp.sum(pairs), metrics


def real_pairs(batch: dict) -> jax.Array:
    """[B] float32: 1 for a pair, 0 for a row of zeros padding a last, short held-out batch
    (a real row starts with a token of segment 1)."""
    return (batch["chosen_segment_ids"][:, 0] != 0).astype(jnp.float32)


def sequence_logprob(apply_fn, params, tokens, positions, segment_ids, targets, mask) -> jax.Array:
    """Sum over masked positions of log p(target): [B]."""
    logits = apply_fn(params, tokens, positions, segment_ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(tok * mask.astype(jnp.float32), axis=-1)


def dpo(apply_fn, params, batch, frozen=None, beta: float = 0.1) -> tuple[jax.Array, jax.Array, dict]:
    """Direct Preference Optimization (Rafailov et al. 2023) against the frozen reference
    policy `frozen`:  L = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) -
    (log pi(y_r) - log ref(y_r))]), log-probabilities summed over the answer tokens."""
    args = [_both_sides(batch, f) for f in ("tokens", "positions", "segment_ids", "targets", "loss_mask")]
    policy = sequence_logprob(apply_fn, params, *args)
    reference = jax.lax.stop_gradient(sequence_logprob(apply_fn, frozen, *args))
    B = batch["margin"].shape[0]
    pairs = real_pairs(batch)
    ratio = policy - reference
    logits = beta * (ratio[:B] - ratio[B:])
    losses = jax.nn.softplus(-logits)
    return jnp.sum(losses * pairs), jnp.sum(pairs), {
        "accuracy": jnp.sum((logits > 0) * pairs),
        "chosen_reward": jnp.sum(beta * ratio[:B] * pairs), "rejected_reward": jnp.sum(beta * ratio[B:] * pairs)}



PPO_FEATURES = ("old_logp", "old_values", "advantages", "returns")  # float32 [B, T], aligned with `targets`


def ppo(apply_fn, params, batch, frozen=None, clip_eps: float = 0.2, value_clip: float = 0.2,
        vf_coef: float = 0.1, temperature: float = 1.0) -> tuple[jax.Array, jax.Array, dict]:
    """PPO's update on a rollout mini-batch (paper 3.2.3, after Stiennon et al. 2020): the
    clipped surrogate on the response tokens (`loss_mask`) plus `vf_coef` times the
    clipped value loss of the value head; the KL penalty is already in the advantages.
    `apply_fn` returns {"lm": logits, "value": values}. `temperature`: the policy is
    softmax(logits / temperature), the distribution the rollouts were sampled from."""
    from llama_jax import rlhf

    out = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = -token_cross_entropy(out["lm"] / temperature, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    policy, clipped = rlhf.clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip_eps)
    value = rlhf.value_loss(out["value"].astype(jnp.float32), batch["old_values"], batch["returns"], mask, value_clip)
    approx_kl = jnp.sum((batch["old_logp"] - logp) * mask)
    return policy + vf_coef * value, jnp.sum(mask), {"policy_loss": policy, "value_loss": value,
                                                     "clip_fraction": clipped, "approx_kl_old": approx_kl}
