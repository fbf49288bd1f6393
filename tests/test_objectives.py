"""The fine-tuning objectives against hand-computed numbers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import objectives


def sig(x):
    return 1 / (1 + math.exp(-x))


def pair_batch(B=2, T=4):
    z = jnp.zeros((B, T), jnp.int32)
    batch = {f"{s}_{k}": z for s in ("chosen", "rejected") for k in ("tokens", "positions", "targets")}
    batch.update({f"{s}_segment_ids": jnp.ones((B, T), jnp.int32) for s in ("chosen", "rejected")})
    batch.update({f"{s}_loss_mask": jnp.ones((B, T)) for s in ("chosen", "rejected")})
    return batch


def test_rows_of_zeros_padding_a_short_held_out_batch_weigh_nothing():
    """A held-out set's last, short batch is padded with rows of zeros (`pad_batch`): the
    ranking and DPO sums and weights are those of the real pairs alone (the eval loss of a
    set smaller than one batch used to be missing)."""
    from llama_jax.data.pipeline import pad_batch

    def scorer(params, tokens, positions, segment_ids, score_mask=None):  # a padding row scores 1, not 0
        return tokens[:, 0].astype(jnp.float32) * params + 1.0

    def lm(params, tokens, positions, segment_ids):
        return jnp.stack([params * tokens.astype(jnp.float32) + 0.3, jnp.zeros(tokens.shape)], axis=-1)

    batch = {**{k: np.asarray(v) for k, v in pair_batch(2, 4).items()}, "margin": np.array([1.0, 0.0], np.float32),
             "chosen_safe": np.array([1, 0], np.int32), "rejected_safe": np.array([0, -1], np.int32)}
    batch["chosen_tokens"] = np.array([[3, 1, 2, 2], [1, 1, 0, 2]], np.int32)
    batch["rejected_tokens"] = np.array([[2, 2, 1, 0], [4, 0, 1, 1]], np.int32)
    padded = pad_batch(batch, 5)
    assert padded["margin"].shape == (5,) and not padded["chosen_segment_ids"][2:].any()
    for objective, fn, params in ((functools.partial(objectives.ranking, safety_weight=0.5), scorer, 0.7),
                                  (functools.partial(objectives.dpo, frozen=0.2), lm, 0.9)):
        def same(b):
            return objective(fn, params, {k: jnp.asarray(v) for k, v in b.items()})

        (loss, weight, m), (loss_p, weight_p, m_p) = same(batch), same(padded)
        assert float(weight) == float(weight_p) == 2
        assert float(loss_p) == pytest.approx(float(loss), rel=1e-6)
        for k in m:
            assert float(m_p[k]) == pytest.approx(float(m[k]), rel=1e-6, abs=1e-7), k


def test_ranking_loss_with_margin_by_hand():
    # The fake model returns fixed scores: rows 0..B-1 chosen, B..2B-1 rejected.
    def apply_fn(params, tokens, positions, segment_ids, score_mask=None):
        assert tokens.shape[0] == 4  # chosen and rejected in one forward pass
        # The answer's own tokens: the loss mask (positions predicting them) moved right.
        np.testing.assert_array_equal(score_mask, [[0, 1, 1, 1]] * 4)
        return params

    scores = jnp.array([2.0, 0.5, 1.0, 1.5])  # pairs: (2.0 vs 1.0), (0.5 vs 1.5)
    batch = {**pair_batch(), "margin": jnp.array([1.0, 1 / 3])}
    loss_sum, weight, m = objectives.ranking(apply_fn, scores, batch)
    expected = -math.log(sig(2.0 - 1.0 - 1.0)) - math.log(sig(0.5 - 1.5 - 1 / 3))
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)
    assert float(weight) == 2 and float(m["accuracy"]) == 1.0 and float(m["reward_margin"]) == pytest.approx(0.0)
    # A larger margin asks for a larger gap: the loss grows.
    larger = objectives.ranking(apply_fn, scores, {**batch, "margin": jnp.array([3.0, 1.0])})[0]
    assert float(larger) > float(loss_sum)
    # Gradient: d/dr_c of -log sigmoid(r_c - r_r - m) = -(1 - sigmoid(r_c - r_r - m)).
    g = jax.grad(lambda s: objectives.ranking(apply_fn, s, batch)[0])(scores)
    assert float(g[0]) == pytest.approx(-(1 - sig(0.0)), rel=1e-6)
    assert float(g[2]) == pytest.approx(1 - sig(0.0), rel=1e-6)


def test_safety_auxiliary_term_by_hand():
    """3 pairs, 4 labelled responses (2 unlabelled): the BCE is the mean over the labelled
    responses times the number of pairs (per-pair like the ranking term), not their sum."""
    def apply_fn(params, tokens, positions, segment_ids, score_mask=None):
        return params

    scores = jnp.array([2.0, 0.5, 0.3, -1.0, 1.5, 0.7])  # chosen 0..2, rejected 0..2
    batch = {**pair_batch(B=3), "margin": jnp.zeros(3), "chosen_safe": jnp.array([1, -1, 1]),
             "rejected_safe": jnp.array([0, -1, 0])}
    base = float(objectives.ranking(apply_fn, scores, batch)[0])
    with_aux, weight, m = objectives.ranking(apply_fn, scores, batch, safety_weight=0.5)
    # Labelled: chosen 0 and 2 (safe, r=2.0, 0.3), rejected 0 and 2 (unsafe, r=-1.0, 0.7); mean BCE x 3 pairs.
    bce = (-math.log(sig(2.0)) - math.log(sig(0.3)) - math.log(1 - sig(-1.0)) - math.log(1 - sig(0.7))) / 4 * 3
    assert float(weight) == 3
    assert float(m["safety_bce"]) == pytest.approx(bce, rel=1e-6)
    assert float(with_aux) == pytest.approx(base + 0.5 * bce, rel=1e-6)


def test_dpo_loss_by_hand():
    # Logits chosen so every log-probability is known: V=2, each position's logits [a, 0].
    def apply_fn(params, tokens, positions, segment_ids):
        return jnp.stack([params, jnp.zeros_like(params)], axis=-1)  # [2B, T, 2]

    B, T = 1, 3
    policy = jnp.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])  # rows: chosen, rejected
    reference = jnp.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    targets = jnp.array([[0, 1, 0]]), jnp.array([[1, 0, 0]])
    mask = jnp.array([[0.0, 1.0, 1.0]]), jnp.array([[1.0, 1.0, 0.0]])
    batch = {**pair_batch(B, T), "margin": jnp.zeros(B), "chosen_targets": targets[0],
             "rejected_targets": targets[1], "chosen_loss_mask": mask[0], "rejected_loss_mask": mask[1]}
    beta = 0.5

    def logp(a, target):  # log softmax([a, 0])[target]
        return -math.log1p(math.exp(-a)) if target == 0 else -math.log1p(math.exp(a))

    def seq(logits_row, tgt, msk):
        return sum(logp(float(a), int(t)) * float(w) for a, t, w in zip(logits_row, tgt, msk))

    pc, pr = seq(policy[0], targets[0][0], mask[0][0]), seq(policy[1], targets[1][0], mask[1][0])
    rc, rr = seq(reference[0], targets[0][0], mask[0][0]), seq(reference[1], targets[1][0], mask[1][0])
    z = beta * ((pc - rc) - (pr - rr))
    loss_sum, weight, m = objectives.dpo(apply_fn, policy, batch, frozen=reference, beta=beta)
    assert float(loss_sum) == pytest.approx(-math.log(sig(z)), rel=1e-5)
    assert float(weight) == 1 and float(m["accuracy"]) == float(z > 0)
    assert float(m["chosen_reward"]) == pytest.approx(beta * (pc - rc), rel=1e-5)
    # No gradient flows into the frozen reference.
    g_ref = jax.grad(lambda r: objectives.dpo(apply_fn, policy, batch, frozen=r, beta=beta)[0])(reference)
    assert float(jnp.abs(g_ref).max()) == 0.0


def test_dpo_first_step_with_the_policy_as_its_own_reference():
    """At DPO's first step the policy is its reference: every pair's logit is 0, so the
    loss per pair is exactly ln 2, no pair counts as ranked right, both rewards are 0 (a
    padding row weighs nothing), and the gradient is -beta/2 x that of log pi(y_c) - log pi(y_r)."""
    V, B, T, beta = 7, 3, 5, 0.1
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(V, V)), jnp.float32)

    def apply_fn(p, tokens, positions, segment_ids):  # logits: a row of p per token
        return p[tokens]

    batch = {**pair_batch(B, T), "margin": jnp.zeros(B)}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
        batch[f"{side}_targets"] = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
        batch[f"{side}_loss_mask"] = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
        batch[f"{side}_segment_ids"] = batch[f"{side}_segment_ids"].at[B - 1].set(0)  # the last row: padding

    def loss(p):
        return objectives.dpo(apply_fn, p, batch, frozen=jnp.array(params), beta=beta)

    loss_sum, weight, m = jax.jit(loss)(params)
    assert float(weight) == 2 and float(loss_sum) / 2 == pytest.approx(math.log(2), rel=1e-6)
    assert float(m["accuracy"]) == 0 and float(m["chosen_reward"]) == float(m["rejected_reward"]) == 0

    def margin(p):  # sum over real pairs of log pi(y_c) - log pi(y_r)
        lp = {s: objectives.sequence_logprob(apply_fn, p, *(batch[f"{s}_{k}"] for k in (
            "tokens", "positions", "segment_ids", "targets", "loss_mask"))) for s in ("chosen", "rejected")}
        return jnp.sum((lp["chosen"] - lp["rejected"])[:B - 1])

    g = jax.jit(jax.grad(lambda p: loss(p)[0]))(params)
    assert float(jnp.abs(g).max()) > 1e-3
    np.testing.assert_allclose(g, -beta / 2 * jax.jit(jax.grad(margin))(params), rtol=1e-5, atol=1e-7)


def test_next_token_loss_covers_only_masked_targets():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))

    def apply_fn(params, tokens, positions, segment_ids):
        return logits

    batch = {"tokens": jnp.zeros((1, 3), jnp.int32), "positions": jnp.zeros((1, 3), jnp.int32),
             "segment_ids": jnp.ones((1, 3), jnp.int32), "targets": jnp.array([[0, 1, 2]]),
             "loss_mask": jnp.array([[1.0, 1.0, 0.0]])}
    loss_sum, weight, m = objectives.next_token(apply_fn, None, batch)
    assert float(loss_sum) == pytest.approx(-math.log(0.5) - math.log(0.8), rel=1e-6)
    assert float(weight) == 2 and float(m["accuracy"]) == 2
    np.testing.assert_allclose(objectives.token_cross_entropy(logits, batch["targets"])[0, 2], math.log(3), rtol=1e-6)


def test_ppo_ratios_are_those_of_the_tempered_policy_the_rollouts_came_from():
    """objectives.ppo at temperature t scores log softmax(logits / t): old log-probs
    taken at the same t give ratio 1 (loss -mean(A), nothing clipped); at t = 1 the same
    rollouts' ratios differ from 1."""
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]]])  # [B=1, T=3, V=3]
    targets = jnp.array([[0, 1, 1]])
    t = 1.5
    old = jax.nn.log_softmax(logits / t)[0, jnp.arange(3), targets[0]][None]
    batch = {"tokens": jnp.zeros((1, 3), jnp.int32), "positions": jnp.zeros((1, 3), jnp.int32),
             "segment_ids": jnp.ones((1, 3), jnp.int32), "targets": targets,
             "loss_mask": jnp.array([[1.0, 1.0, 1.0]]), "old_logp": old, "advantages": jnp.array([[1.0, -2.0, 0.5]]),
             "old_values": jnp.zeros((1, 3)), "returns": jnp.zeros((1, 3))}

    def apply_fn(params, *_):
        return {"lm": logits, "value": jnp.zeros((1, 3))}

    loss, count, aux = objectives.ppo(apply_fn, None, batch, vf_coef=0.0, temperature=t)
    assert float(loss) == pytest.approx(-(1.0 - 2.0 + 0.5), abs=1e-6) and float(count) == 3.0
    assert float(aux["clip_fraction"]) == 0.0 and float(aux["approx_kl_old"]) == pytest.approx(0.0, abs=1e-6)
    # the last token: p = 1/(1 + 1 + e^3) at t = 1 against 1/(2 + e^2) at t = 1.5, a ratio of 0.41: clipped
    _, _, aux1 = objectives.ppo(apply_fn, None, batch, vf_coef=0.0)
    assert float(aux1["clip_fraction"]) >= 1.0


def test_ppo_loss_is_policy_plus_vf_coef_times_value_loss_at_a_temperature_by_hand():
    """objectives.ppo with vf_coef 0.1, temperature 2 and a mask excluding the last token:
    the loss is the clipped surrogate of log softmax(logits / 2) plus 0.1 x the clipped
    value loss, every number by hand (some ratios and values clipped, some not)."""
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]]
    targets, mask = [0, 1, 2, 1], [1.0, 1.0, 1.0, 0.0]
    old_logp, adv = [-0.9, -0.6, -0.9, -2.0], [1.0, -2.0, 0.5, 3.0]  # ratios at t 2: 1.55, 0.88, 1.70, 1.38
    values, old_values, returns = [0.5, -0.2, 1.0, 2.0], [0.0, 0.0, 0.9, 0.0], [1.0, 0.5, -1.0, 4.0]
    t, eps, vclip, vf = 2.0, 0.2, 0.2, 0.1

    def logp_of(temperature, row, target):
        z = [a / temperature for a in row]
        return z[target] - math.log(sum(math.exp(v) for v in z))

    def by_hand(temperature):
        policy = value = 0.0
        for i in range(4):
            ratio = math.exp(logp_of(temperature, logits[i], targets[i]) - old_logp[i])
            policy += -min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i]) * mask[i]
            v_clipped = old_values[i] + min(max(values[i] - old_values[i], -vclip), vclip)
            value += 0.5 * max((values[i] - returns[i]) ** 2, (v_clipped - returns[i]) ** 2) * mask[i]
        return policy, value

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    batch = {"tokens": jnp.zeros((1, 4), jnp.int32), "positions": jnp.zeros((1, 4), jnp.int32),
             "segment_ids": jnp.ones((1, 4), jnp.int32), "targets": jnp.array([targets]),
             "loss_mask": f32([mask]), "old_logp": f32([old_logp]), "advantages": f32([adv]),
             "old_values": f32([old_values]), "returns": f32([returns])}

    def apply_fn(params, *_):
        return {"lm": f32([logits]), "value": f32([values])}

    loss, count, aux = objectives.ppo(apply_fn, None, batch, clip_eps=eps, value_clip=vclip, vf_coef=vf,
                                      temperature=t)
    policy, value = by_hand(t)
    assert value > 1.0 and abs(policy - by_hand(1.0)[0]) > 0.1  # the value term and the temperature both matter
    assert float(aux["policy_loss"]) == pytest.approx(policy, rel=1e-5)
    assert float(aux["value_loss"]) == pytest.approx(value, rel=1e-5)
    assert float(loss) == pytest.approx(policy + vf * value, rel=1e-5) and float(count) == 3.0
    ratios = [math.exp(logp_of(t, logits[i], targets[i]) - old_logp[i]) for i in range(3)]
    assert float(aux["clip_fraction"]) == sum(abs(r - 1) > eps for r in ratios) == 2
