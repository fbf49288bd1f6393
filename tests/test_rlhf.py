"""The RLHF arithmetic against hand-computed values: gating at 0.15, whitening, logit,
per-token KL and rewards, GAE, PPO's clipped policy loss (value and gradient), the
clipped value loss, and rejection sampling's best-of-K choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import rlhf


def test_gating_uses_the_safety_score_for_tagged_or_unsafe_prompts():
    helpful = jnp.array([0.9, 0.9, 0.9, 0.9])
    safety = jnp.array([0.5, 0.1, 0.8, 0.15])
    tagged = jnp.array([0, 0, 1, 0])
    np.testing.assert_allclose(rlhf.gate_reward(helpful, safety, tagged), [0.9, 0.1, 0.8, 0.9])  # 0.15 is not < 0.15


def test_whiten_and_logit():
    np.testing.assert_allclose(rlhf.whiten(jnp.array([1.0, 2.0, 3.0, 4.0])),
                               [-1.3416408, -0.4472136, 0.4472136, 1.3416408], rtol=1e-5)
    masked = rlhf.whiten(jnp.array([1.0, 3.0, 100.0]), mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose(masked[:2], [-1.0, 1.0], rtol=1e-5)  # the masked-out 100 does not count
    np.testing.assert_allclose(rlhf.logit(jnp.array([0.5, 0.8])), [0.0, np.log(4.0)], rtol=1e-6, atol=1e-7)


def test_kl_and_token_rewards():
    logp = jnp.array([[0.0, -1.0, -2.0, 0.0]])
    ref = jnp.array([[0.0, -1.5, -1.0, 0.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])  # prompt token, two response tokens, padding
    np.testing.assert_allclose(rlhf.kl_per_token(logp, ref, mask), [[0.0, 0.5, -1.0, 0.0]])
    rewards = rlhf.token_rewards(jnp.array([2.0]), logp, ref, mask, beta=0.1)
    np.testing.assert_allclose(rewards, [[0.0, -0.05, 2.1, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("gamma,lam,a1", [(1.0, 0.95, 0.45 + 0.95 * 1.1), (0.9, 0.8, 0.35 + 0.72 * 1.1)])
def test_gae_by_hand(gamma, lam, a1):
    rewards = jnp.array([[0.0, -0.05, 2.1, 0.0]])
    values = jnp.array([[9.0, 0.5, 1.0, 9.0]])  # values outside the response are ignored
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])
    adv, ret = rlhf.gae(rewards, values, mask, gamma, lam)
    # delta_2 = 2.1 - 1.0 = 1.1 (episode ends); delta_1 = -0.05 + gamma * 1.0 - 0.5
    np.testing.assert_allclose(adv, [[0.0, a1, 1.1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, a1 + 0.5, 2.1, 0.0]], rtol=1e-6)


def test_clipped_policy_loss_value_and_gradient():
    old = jnp.zeros(3)
    logp = jnp.log(jnp.array([1.5, 0.5, 1.3]))
    adv = jnp.array([1.0, 1.0, -1.0])
    mask = jnp.ones(3)
    loss, clipped = rlhf.clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(-1.3, -1.2) = -1.3  -> -(1.2 + 0.5 - 1.3)
    assert float(loss) == pytest.approx(-0.4, abs=1e-6) and float(clipped) == 3.0
    grad = jax.grad(lambda lp: rlhf.clipped_policy_loss(lp, old, adv, mask)[0])(logp)
    # the clipped token has no gradient; the others -A * ratio
    np.testing.assert_allclose(grad, [0.0, -0.5, 1.3], rtol=1e-6, atol=1e-7)


def test_clipped_value_loss():
    loss = rlhf.value_loss(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), jnp.array([2.0, 0.0]), jnp.ones(2), 0.2)
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09), rel=1e-6)  # max(1, (0.7-2)^2), max(0, 0.3^2)


def test_best_of_k():
    assert rlhf.best_of([0.1, 0.9, 0.3, 0.5, 0.2, 0.7], 3) == [1, 5]
