"""The RLHF arithmetic against hand-computed values: gating at 0.15, whitening, logit,
per-token KL and rewards, GAE, PPO's clipped policy loss (value and gradient), the
clipped value loss, rejection sampling's best-of-K choice (plain and regularised by the
policy's log-probability) and its accuracy against N, PPO's sequence score (with the
reference's log-probability added),
and the toy check as a gold reward (CodeReward)."""

import json
import math
import os
import types

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


def test_reward_models_gate_only_with_a_safety_model(monkeypatch):
    """With a safety RM, a tagged prompt's reward is the safety score; without one
    (rlhf.safety_reward_model ""), every reward is the helpfulness score: a missing safety
    model must not score every answer to a tagged prompt 1.0. The safety model alone
    (safety distillation) gives its score and no gated reward."""
    from llama_jax import evaluate

    raw = {"helpful": np.array([-3.0, -3.0, 2.0]), "safety": np.array([-1.0, 3.0, 3.0])}
    monkeypatch.setattr(evaluate, "score", lambda cfg, params, tok, dialogs, **kw: raw[cfg])
    tagged = [True, False, False]
    rms = rlhf.RewardModels.__new__(rlhf.RewardModels)
    rms.on_mesh, rms.rules, rms.threshold = False, None, rlhf.SAFETY_THRESHOLD
    rms.models = {"helpful": ("helpful", None, None, None)}
    sig = 1.0 / (1.0 + np.exp(-raw["helpful"]))
    np.testing.assert_allclose(rms(["a", "b", "c"], tagged)["gated"], sig)
    rms.models["safety"] = ("safety", None, None, None)
    np.testing.assert_allclose(rms(["a", "b", "c"], tagged)["gated"], [1.0 / (1.0 + np.exp(1.0)), sig[1], sig[2]],
                               rtol=1e-6)
    rms.models = {"safety": ("safety", None, None, None)}  # safety distillation's: the safety model alone
    alone = rms(["a", "b", "c"], tagged)
    assert sorted(alone) == ["safety"]
    np.testing.assert_allclose(alone["safety"], 1.0 / (1.0 + np.exp(-raw["safety"])))


def test_whiten_and_logit():
    np.testing.assert_allclose(rlhf.whiten(jnp.array([1.0, 2.0, 3.0, 4.0])),
                               [-1.3416408, -0.4472136, 0.4472136, 1.3416408], rtol=1e-5)
    masked = rlhf.whiten(jnp.array([1.0, 3.0, 100.0]), mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose(masked[:2], [-1.0, 1.0], rtol=1e-5)  # the masked-out 100 does not count
    np.testing.assert_allclose(rlhf.logit(jnp.array([0.5, 0.8])), [0.0, np.log(4.0)], rtol=1e-6, atol=1e-7)


def test_center_groups_subtracts_each_prompts_mean():
    x = jnp.array([1.0, 3.0, 10.0, 20.0, 5.0, 5.0])
    np.testing.assert_allclose(rlhf.center_groups(x, 2), [-1.0, 1.0, -5.0, 5.0, 0.0, 0.0])
    np.testing.assert_allclose(rlhf.center_groups(x, 3), [-3.666667, -1.666667, 5.333333, 10.0, -5.0, -5.0],
                               rtol=1e-6)
    np.testing.assert_array_equal(rlhf.center_groups(x, 1), x)  # one sample per prompt: the paper's


def test_ppo_score_adds_the_references_log_probability_before_centring():
    gated = jnp.array([0.5, 0.8, 0.5, 0.8])  # logits 0, ln 4, 0, ln 4: two prompts x two answers
    ref_logp = jnp.array([[-9.0, -0.5, -0.5, 0.0], [-9.0, -1.0, -2.0, 0.0], [-9.0, -2.0, 0.0, 0.0],
                          [-9.0, -1.5, -0.5, 0.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0]] * 4)  # a prompt token (its -9 does not count), 2 answer tokens
    # the paper's score: the RM alone prefers each prompt's second answer
    np.testing.assert_allclose(rlhf.ppo_score(gated, ref_logp, mask, 2), [-1.0, 1.0, -1.0, 1.0], rtol=1e-5)
    # logit + 2 * (-1, -3, -2, -2) = (-2, ln 4 - 6, -4, ln 4 - 4); centred: +-(4 - ln 4) / 2, -+ln 4 / 2
    centred = np.array([4 - np.log(4), -(4 - np.log(4)), -np.log(4), np.log(4)]) / 2
    np.testing.assert_allclose(rlhf.ppo_score(gated, ref_logp, mask, 2, ref_weight=2.0),
                               centred / centred.std(), rtol=1e-5)  # the first prompt's preference flips


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
    # Some tokens clipped, some not, the last masked out: the count is of the masked clipped
    # tokens (ratios 1.5 and 0.5), not of the mask's 3 tokens nor of every clipped one (1.4 too).
    logp = jnp.log(jnp.array([1.5, 1.1, 0.5, 1.4]))
    adv, mask = jnp.array([1.0, -1.0, 1.0, 2.0]), jnp.array([1.0, 1.0, 1.0, 0.0])
    loss, clipped = rlhf.clipped_policy_loss(logp, jnp.zeros(4), adv, mask, clip_eps=0.2)
    # min(1.5, 1.2) = 1.2; min(-1.1, -1.1) = -1.1; min(0.5, 0.8) = 0.5; masked -> -(1.2 - 1.1 + 0.5)
    assert float(loss) == pytest.approx(-0.6, abs=1e-6)
    assert float(clipped) == 2.0
    grad = jax.grad(lambda lp: rlhf.clipped_policy_loss(lp, jnp.zeros(4), adv, mask)[0])(logp)
    np.testing.assert_allclose(grad, [0.0, 1.1, -0.5, 0.0], rtol=1e-6, atol=1e-7)


def test_clipped_value_loss():
    loss = rlhf.value_loss(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), jnp.array([2.0, 0.0]), jnp.ones(2), 0.2)
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09), rel=1e-6)  # max(1, (0.7-2)^2), max(0, 0.3^2)


def test_best_of_k():
    assert rlhf.best_of([0.1, 0.9, 0.3, 0.5, 0.2, 0.7], 3) == [1, 5]
    # an answer cut at max_new_tokens is never picked, however it scores; a prompt with none gives -1
    assert rlhf.best_finished([[0.1, 0.9, 0.3], [0.5, 0.2, 0.7]], [[True, False, True], [False, False, False]]) == [
        2, -1]


def test_training_answers_that_did_not_finish_are_dropped(monkeypatch):
    """GAtt and safety distillation train on sampled answers with an EOS appended: one
    that ran into max_new_tokens is None (never trained), unless all answers are wanted."""
    from llama_jax import generate as gen
    from llama_jax import tokenizer as tk
    from llama_jax.model import LlamaConfig
    from llama_jax.stages import _greedy_answers

    class Tok:  # ids as text
        eos_id = tk.EOS_ID
        answer = tk.Tokenizer.answer

        def encode_dialog(self, dialog):
            return [1, 5]

        def decode(self, ids):
            return " ".join(map(str, ids))

    rows = [[7, 8, 9], [7, tk.EOS_ID], [tk.EOS_ID]]  # cut at the limit of 3; finished; EOS at once
    monkeypatch.setattr(gen, "generate", lambda cfg, params, prompts, n, **kw: gen.Generation(rows, [[0.0]] * 3))
    dialogs = [[{"role": "user", "content": q}] for q in "abc"]
    cfg = LlamaConfig.tiny()
    assert _greedy_answers(cfg, None, Tok(), dialogs, 3) == ["7 8 9", "7", ""]
    assert _greedy_answers(cfg, None, Tok(), dialogs, 3, finished_only=True) == [None, "7", ""]


def test_accuracy_curve_follows_the_reward_models_pick_among_the_first_n():
    rewards = [[0.2, 0.9, 0.5, 0.95],  # picks: 1 of 1 -> s0, of 2 -> s1, of 4 -> s3
               [0.8, 0.1, 0.3, 0.2],   # s0 every time
               [0.1, 0.4, 0.9, 0.3]]   # s0, s1, s2
    correct = [[True, False, True, False],
               [True, True, True, True],
               [False, True, False, True]]
    curve = rlhf.accuracy_curve(rewards, correct, [1, 2, 4, 8])
    assert curve == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(1 / 3)}  # no 8: only 4 samples
    # reward over-optimisation: the max reward rises with N while the accuracy falls
    assert rlhf.reward_curve(rewards, [1, 4])[4]["max"] > rlhf.reward_curve(rewards, [1, 4])[1]["max"]


def test_regularized_best_of_n_weighs_the_policys_log_probability():
    rewards = np.array([[0.9, 0.99, 0.5]])
    logprobs = np.array([[-1.0, -4.0, -0.5]])  # log pi(answer) of the whole answer
    # beta 0 is the paper's argmax of the reward, the rewards returned unchanged
    np.testing.assert_array_equal(rlhf.selection_scores(rewards, logprobs, 0.0), rewards)
    assert rlhf.best_of(rlhf.selection_scores(rewards, logprobs, 0.0), 3) == [1]
    # beta 1: logit(R) + log pi = ln 9 - 1 = 1.197, ln 99 - 4 = 0.595, 0 - 0.5 = -0.5
    scores = rlhf.selection_scores(rewards, logprobs, 1.0)
    np.testing.assert_allclose(scores, [[np.log(9) - 1.0, np.log(99) - 4.0, -0.5]], rtol=1e-5)
    assert rlhf.best_of(scores, 3) == [0]  # the likelier answer beats a slightly higher reward
    assert rlhf.best_of(rlhf.selection_scores(rewards, logprobs, 100.0), 3) == [2]  # the policy's mode
    # the accuracy curve follows the same picks: 0.99 (wrong) at beta 0, 0.9 (right) at beta 1
    correct = [[True, False, False]]
    assert rlhf.accuracy_curve(rlhf.selection_scores(rewards, logprobs, 0.0), correct, [3]) == {3: 0.0}
    assert rlhf.accuracy_curve(scores, correct, [3]) == {3: 1.0}


def test_keep_best_drops_answers_below_min_reward():
    records = [{"reward": 0.2}, {"reward": 0.7}, {"reward": 0.5}]
    assert rlhf.keep_best(records, 0.0) == records  # the paper: every prompt's best
    assert rlhf.keep_best(records, 0.5) == [{"reward": 0.7}, {"reward": 0.5}]
    with pytest.raises(ValueError, match=r"rlhf.min_reward=0.9 \(the highest is 0.700\)"):
        rlhf.keep_best(records, 0.9)


def test_code_labelled_pairs_from_policy_samples():
    from llama_jax.data.prompts import Prompt
    from llama_jax.data.synthetic import REFUSAL

    def prompt(q, ref, safety=False):
        task = "safety" if safety else "add" if "+" in q else "copy"
        return Prompt([{"role": "user", "content": q}], safety, [1], "x:1",
                      {"messages": [], "reference": ref, "task": task})

    def samples(*texts):
        return [rlhf.Sample(t, [], [], True) for t in texts]

    prompts = [prompt("What is 2 + 2?", "4"), prompt("What is 1 + 1?", "2"), prompt("Repeat exactly: a", "a"),
               prompt("Tell me how to hack a bank.", REFUSAL, safety=True), prompt("no reference", None)]
    del prompts[-1].record["reference"]
    answers = [samples("4", "5", "5", "6"),  # right vs two distinct wrong answers
               samples("3", "3"),  # none right: the reference is the chosen answer
               samples("a", " a "),  # all right: no pair
               samples(REFUSAL, "Sure. To hack a bank, ..."),  # safety: the refusal wins
               samples("x", "y")]  # no reference: skipped
    pairs = rlhf.code_labelled_pairs(prompts, answers, pairs_per_prompt=5, seed=0)
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p["prompt"][0]["content"], []).append(p)
    assert sorted((p["chosen"], p["rejected"], p["rating"]) for p in by_prompt["What is 2 + 2?"]) == [
        ("4", "5", "better"), ("4", "6", "better")]
    assert [(p["chosen"], p["rejected"], p["rating"]) for p in by_prompt["What is 1 + 1?"]] == [
        ("2", "3", "significantly_better")]
    assert "Repeat exactly: a" not in by_prompt and len(pairs) == 4
    (safety,) = by_prompt["Tell me how to hack a bank."]
    assert safety["chosen"] == REFUSAL and safety["is_safety_prompt"] and safety["rejected_safe"] is False
    assert [p["task"] for p in pairs] == ["add", "add", "add", "safety"]  # for the RM's per-task accuracy
    assert len(rlhf.code_labelled_pairs(prompts, answers, pairs_per_prompt=1, seed=0)) == 3  # capped per prompt


def test_safety_preprompt_goes_before_the_request_or_into_a_system_message():
    from llama_jax.stages import with_preprompt

    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Reverse the words: burn a train"}]
    assert with_preprompt(dialog, "Be safe.", "prefix") == [*dialog[:2], {"role": "user", "content":
                                                                            "Be safe. Reverse the words: burn a train"}]
    assert with_preprompt(dialog, "Be safe.", "system") == [{"role": "system", "content": "Be safe."}, *dialog]
    assert dialog[2]["content"] == "Reverse the words: burn a train"  # the prompt itself is not changed
    own = [{"role": "system", "content": "Answer briefly."}, *dialog]
    assert with_preprompt(own, "Be safe.", "system") == [{"role": "system", "content": "Be safe.\nAnswer briefly."},
                                                         *dialog]
    assert own[0]["content"] == "Answer briefly."


def test_code_reward_scores_by_the_toy_check_and_gates_safety_prompts(tmp_path):
    import json

    def user(text):
        return [{"role": "user", "content": text}]

    path = tmp_path / "prompts_train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": user("What is 2 + 3?"), "is_safety": False, "reference": "5"},
        {"messages": user("How to burn a car?"), "is_safety": True, "reference": "I cannot help with that."}]) + "\n")
    reward = rlhf.CodeReward([str(tmp_path / "prompts_*.jsonl"), "", str(tmp_path / "not_yet" / "*.jsonl")])
    dialogs = [user("What is 2 + 3?") + [{"role": "assistant", "content": a}] for a in (" 5 ", "6")] + \
              [user("How to burn a car?") + [{"role": "assistant", "content": a}]
               for a in ("I cannot help with that because it could cause harm.", "Sure. First gather the tools.")]
    out = reward(dialogs, [False, False, True, True])
    np.testing.assert_array_equal(out["helpful"], [1, 0, 1, 0])
    np.testing.assert_array_equal(out["safety"], [1, 1, 1, 0])  # a benign prompt's answer is safe
    np.testing.assert_array_equal(out["gated"], [1, 0, 1, 0])
    # a prompt file written later (the eval split) is read when one of its prompts is asked about
    (tmp_path / "prompts_eval.jsonl").write_text(json.dumps(
        {"messages": user("What is 1 + 1?"), "is_safety": False, "reference": "2"}) + "\n")
    assert reward([user("What is 1 + 1?") + [{"role": "assistant", "content": "2"}]], [False])["gated"][0] == 1
    from llama_jax.data.sources import DataError

    with pytest.raises(DataError, match=r"no `reference` answer for the prompt 'Hello'"):  # one line from main
        reward([user("Hello") + [{"role": "assistant", "content": "Hi"}]], [False])


def test_true_accuracy_overall_and_per_task():
    from types import SimpleNamespace

    from llama_jax.stages import _true_accuracy

    prompts = [SimpleNamespace(record=r) for r in (
        {"reference": "5", "task": "add"}, {"reference": "7", "task": "add"}, {"reference": "a b", "task": "copy"},
        {}, {"reference": "x"})]  # no reference: not counted; no task: overall only
    texts = ["5", "8", " a b ", "anything", "x"]
    assert _true_accuracy("acc", prompts, texts) == {"acc": 0.75}
    assert _true_accuracy("acc", prompts, texts, by_task=True) == {"acc": 0.75, "acc_add": 0.5, "acc_copy": 1.0}
    assert _true_accuracy("acc", prompts[3:4], texts[3:4], by_task=True) == {}


def test_paired_change_and_its_standard_error_by_hand():
    before = [1, 1, 0, 0, 1, 0, 1, 1]
    after = [1, 0, 1, 1, 1, 0, 1, 1]  # one lost, two gained
    out = rlhf.paired_change(before, after)
    # differences 0 -1 1 1 0 0 0 0: mean 1/8; squared deviations 5 x (1/8)^2 + (9/8)^2 + 2 x (7/8)^2 = 184/64,
    # sample variance 184/64/7, SE sqrt(variance / 8)
    assert out == {"change": pytest.approx(0.125), "se": pytest.approx(math.sqrt(184 / 64 / 7 / 8)), "gained": 2,
                   "lost": 1}
    assert rlhf.paired_change([1, 0], [1, 0])["se"] == 0.0  # the same answers: no change, no noise
    with pytest.raises(ValueError, match="not the same prompts"):
        rlhf.paired_change([1, 0, 1], [1, 0])


def test_a_sampled_pass_is_paired_per_prompt_not_per_answer():
    from types import SimpleNamespace

    from llama_jax.stages import _paired_changes, _per_prompt

    # two prompts, two sampled answers each (rlhf.eval_samples 2)
    asked = [SimpleNamespace(record={"reference": r}) for r in ("a", "a", "b", "b")]
    before = _per_prompt(asked, ["a", "x", "x", "x"], [0.5, 0.1, 0.2, 0.2], group=2)
    after = _per_prompt(asked, ["a", "a", "b", "x"], [0.9, 0.7, 0.6, 0.2], group=2)
    assert before == {"reward": pytest.approx([0.3, 0.2]), "true_accuracy": [0.5, 0.0]}
    assert after == {"reward": pytest.approx([0.8, 0.4]), "true_accuracy": [1.0, 0.5]}
    out = _paired_changes({"eval_sampled_": after}, {"eval_sampled_": before})
    # per-prompt differences: reward 0.5, 0.2 (mean 0.35, SE |0.5 - 0.2| / 2); accuracy 0.5, 0.5 (SE 0)
    assert out["eval_sampled_change_in_reward"] == pytest.approx(0.35)
    assert out["eval_sampled_change_in_reward_se"] == pytest.approx(0.15)
    assert out["eval_sampled_change_in_true_accuracy"] == pytest.approx(0.5)
    assert out["eval_sampled_change_in_true_accuracy_se"] == pytest.approx(0.0)
    # per answer, the four reward differences 0.4 0.6 0.4 0 would give SE 0.126: not the prompts' spread
    assert _paired_changes({"eval_": after}, {"eval_": {"reward": [0.1]}}) == {}  # not the same prompts: no change


def test_varied_groups_counts_prompts_whose_answers_differ():
    from llama_jax.stages import varied_groups

    assert varied_groups(["4", "4", "5 6", "5 6", "1", "2"], 2) == pytest.approx(1 / 3)
    assert varied_groups(["a", "a", "a", "a", "b", "a"], 3) == 0.5


def test_varied_rows_marks_each_answer_of_a_varied_prompt():
    from llama_jax.stages import varied_rows

    np.testing.assert_array_equal(varied_rows(["4", "4", "5 6", "5 7", "1", "1"], 2), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(varied_rows(["a", "b", "a"], 3), [1, 1, 1])


def test_ppo_saves_and_stops_only_at_iteration_ends():
    """An iteration's remaining rollouts are not checkpointed: a preemption notice is
    honoured at the iteration's end, and checkpoint / evaluation intervals inside one are
    refused."""
    from procs import load_experiment

    from llama_jax import stages
    from llama_jax.train import RunError

    c = load_experiment("ppo").get_config("tiny")
    c.ppo.epochs, c.ppo.rollout_batch, c.batch_size = 2, 24, 8  # 6 steps an iteration
    assert [s for s in range(1, 19) if stages.PPOStage().can_stop_after(c, s)] == [6, 12, 18]
    assert stages.Stage().can_stop_after(c, 5)
    c.checkpoint_every_steps, c.eval_every_steps = 12, 0
    stages.check_iteration_intervals(c)
    c.eval_every_steps = 9
    with pytest.raises(RunError, match="config.eval_every_steps 9 is not a multiple of the 6 steps of a PPO iteration"):
        stages.check_iteration_intervals(c)


def test_ppo_advantages_leave_uniform_prompts_unmoved():
    from llama_jax import rlhf

    rewards = jnp.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    values = jnp.array([[0.2, 0.3, 0.0], [0.1, -0.4, 0.0], [0.5, 0.6, 0.0], [0.5, 0.6, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]] * 4)
    adv, ret = rlhf.ppo_advantages(rewards, values, mask, jnp.array([1.0, 1.0, 0.0, 0.0]), gamma=1.0, lam=1.0)
    compiled = rlhf.ppo_advantages._cache_size()  # jitted: another rollout of the same shape compiles nothing
    rlhf.ppo_advantages(rewards + 1, values, mask, jnp.array([1.0, 1.0, 0.0, 0.0]), gamma=1.0, lam=1.0)
    assert rlhf.ppo_advantages._cache_size() == compiled
    # lam 1: advantage = return-to-go - value; rows 0-1: [0.8, 0.7] and [-1.1, -0.6], whitened over those 4
    raw = np.array([0.8, 0.7, -1.1, -0.6])
    want = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(np.asarray(adv[:2, :2]).ravel(), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv[2:]), 0.0)  # the critic's error on rows 2-3 moves nothing
    np.testing.assert_array_equal(np.asarray(adv[:, 2]), 0.0)  # nor the padding
    np.testing.assert_allclose(np.asarray(ret[2:, :2]), 0.0, atol=1e-7)  # but their returns still teach the critic
    np.testing.assert_allclose(np.asarray(ret[:2, :2]), [[1.0, 1.0], [-1.0, -1.0]], rtol=1e-6)


def test_eval_passes_sample_eval_samples_or_the_override():
    from llama_jax.configs import rlhf_config
    from llama_jax.stages import _eval_passes

    c = rlhf_config()
    c.rlhf.eval_samples, c.rlhf.temperature = 3, 0.8
    passes = _eval_passes(c, ["p", "q"])
    assert [(name, len(asked), t) for name, asked, t, _ in passes] == [("eval_", 2, 0.0), ("eval_sampled_", 6, 0.8)]
    assert passes[1][1] == ["p"] * 3 + ["q"] * 3  # a prompt's answers side by side
    assert [len(a) for _, a, _, _ in _eval_passes(c, ["p", "q"], samples=1)] == [2, 2]
    assert [len(a) for _, a, _, _ in _eval_passes(c, ["p", "q"], samples=-1)] == [2, 6]  # -1: as eval_samples
    assert [name for name, _, _, _ in _eval_passes(c, ["p"], samples=0)] == ["eval_"]


def test_ppo_evaluation_answers_and_scores_in_chunks(monkeypatch):
    """A held-out pass larger than EVAL_CHUNK_ROWS is answered chunk by chunk (chunk i
    sampled with seed + i) and its scores, texts and KLs come back in the prompts' order."""
    from llama_jax import stages

    monkeypatch.setattr(stages, "EVAL_CHUNK_ROWS", 2)
    seeds = []

    class Fake:
        def _answers(self, params, prompts, temperature, seed):
            seeds.append(seed)
            return [[p] for p in prompts]

        def _evaluate_answers(self, params, prompts, answers):
            n = len(prompts)
            mask = np.ones((n, 2), np.float32)
            logp = np.array([[0.5 * p, 0.0] for p in prompts])
            return ({"loss_mask": mask}, {"gated": np.array(prompts, float) / 10, "texts": [str(p) for p in prompts]},
                    logp, np.zeros((n, 2)), None)

    scored, kl = stages.PPOStage._evaluate_chunks(Fake(), None, [1, 2, 3, 4, 5], 1.0, 100)
    assert seeds == [100, 101, 102]
    assert scored["texts"] == ["1", "2", "3", "4", "5"]
    np.testing.assert_allclose(scored["gated"], [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(kl, [0.5, 1.0, 1.5, 2.0, 2.5])


def test_own_prompt_files_are_checked_when_a_stage_starts(tmp_path, tokenizer_path, capsys):
    """PPO with the tiny preset's early stopping on validation metrics and your own
    prompts without validation prompts, or with a true-accuracy guard on prompts without
    `reference` answers, is refused at its start (it failed after the step-0 evaluation);
    a malformed held-out file too. Safety distillation checks its prompts like the other
    stages (a traceback, or prompts too long for the context scored as empty answers)."""
    import json

    from procs import load_experiment

    from llama_jax.data.sources import DataError
    from llama_jax.stages import PPOStage, SafetyDistillStage
    from llama_jax.tokenizer import Tokenizer
    from llama_jax.train import RunError

    def prompts(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    ask = [{"messages": [{"role": "user", "content": f"question {i}"}], "is_safety": i % 2 == 0} for i in range(4)]
    mine = prompts("mine.jsonl", ask)
    c = load_experiment("ppo").get_config("tiny")
    c.init_from, c.rlhf.reward_model, c.rlhf.prompts = str(tmp_path), str(tmp_path), mine
    with pytest.raises(RunError, match=r"reads val_sampled_reward, .*which the validation prompts give"):
        PPOStage().prepare(c, str(tmp_path / "ppo"))
    c.rlhf.val_prompts = mine
    with pytest.raises(RunError, match=r"val_true_accuracy, val_sampled_true_accuracy, which needs a \"reference\""):
        PPOStage().prepare(c, str(tmp_path / "ppo"))
    c.rlhf.eval_prompts = prompts("bad.jsonl", [{"prompt": "no messages"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'messages'"):
        PPOStage().prepare(c, str(tmp_path / "ppo"))

    tok = Tokenizer(tokenizer_path)
    d = load_experiment("safety_distill").get_config("tiny")
    d.rlhf.prompts, d.seq_len, d.eval_max_new_tokens = mine, 96, 16
    stage = SafetyDistillStage()
    assert [r["messages"][0]["content"] for r in stage._prompts(d, str(tmp_path), "train", True, 8, tok)] == [
        "question 0", "question 2"]
    d.rlhf.prompts = prompts("long.jsonl", [{"messages": [{"role": "user", "content": "word " * 100}],
                                             "is_safety": True}])
    with pytest.raises(DataError, match=r"long.jsonl:1: prompt has \d+ tokens, more than the 80 that config.seq_len "
                                        r"- config.eval_max_new_tokens leaves"):
        stage._prompts(d, str(tmp_path), "train", True, 8, tok)
    # a safety prompt that fits, but not with its preprompt (which it is asked with too), is refused by its line
    d.rlhf.prompts = prompts("near.jsonl", [{"messages": [{"role": "user", "content": "question"}],
                                             "is_safety": True, "preprompt": "Refuse. " * 60}])
    with pytest.raises(DataError, match=r"near.jsonl:1: prompt with its safety preprompt \(system\) has \d+ tokens, "
                                        r"more than the 80"):
        stage._prompts(d, str(tmp_path), "train", True, 8, tok)
    # held-out prompts of one's own are read even when the training prompts are the toy ones
    d.rlhf.prompts, d.rlhf.eval_prompts = "synthetic", mine
    assert [r["messages"][0]["content"] for r in stage._prompts(d, str(tmp_path), "eval", False, 8, tok)] == [
        "question 1", "question 3"]
    d.rlhf.eval_prompts = ""
    # a cap on a prompt file is said; a field that looks like a misspelt one a stage reads is warned
    d.rlhf.prompts = mine
    assert len(stage._prompts(d, str(tmp_path), "train", True, 1, tok)) == 1
    assert "the first 1 of its 2 safety prompts are used (config.distill.num_prompts)" in capsys.readouterr().out
    typo = prompts("typo.jsonl", [{"messages": ask[0]["messages"], "is_saftey": True, "id": 3}])
    from llama_jax.data import prompts as prompt_data

    prompt_data.check(typo)
    assert capsys.readouterr().out == f"warning: {typo}:1: field 'is_saftey' is not read (meant 'is_safety'?)\n"
    # safety distillation checks its files at its start as well: a misspelt field, a preprompt that is not read, a
    # chat tag in a preprompt, a malformed held-out file (before: only after all its training answers were sampled)
    d.init_from, d.rlhf.safety_reward_model = str(tmp_path), str(tmp_path)
    d.rlhf.prompts = prompts("pre.jsonl", [{**ask[1], "preprompt": "Be careful."}, {**ask[0], "is_saftey": True}])
    d.rlhf.eval_prompts = prompts("evalbad.jsonl", [{"prompt": "no messages"}])
    with pytest.raises(DataError, match=r"evalbad.jsonl:1: missing field 'messages' \(it has \['prompt'\]\); a prompt "
                                        r"is .* ending with a user message"):
        SafetyDistillStage().prepare(d, str(tmp_path / "distill"))
    assert capsys.readouterr().out == (
        f"warning: {d.rlhf.prompts}:2: field 'is_saftey' is not read (meant 'is_safety'?)\n"
        f"warning: {d.rlhf.prompts}:1: a \"preprompt\" on a prompt without \"is_safety\": true is not read (only "
        "safety prompts are answered with a preprompt)\n")
    d.rlhf.prompts = prompts("tag.jsonl", [{**ask[0], "preprompt": "Refuse [INST] it"}])
    with pytest.raises(DataError, match=r"tag.jsonl:1: field 'preprompt': the chat format's tag '\[INST\]' cannot"):
        SafetyDistillStage().prepare(d, str(tmp_path / "distill"))
    # validation prompts that are all held-out ones would all be dropped: refused at the start
    c.rlhf.eval_prompts, c.rlhf.val_prompts = mine, mine
    c.early_stopping.guard = ""
    with pytest.raises(RunError, match=r"val_prompts .*mine.jsonl: every prompt is also a held-out one"):
        PPOStage().prepare(c, str(tmp_path / "ppo"))


def test_rejection_sampling_refuses_bad_input_before_it_samples(tmp_path, reference_run, monkeypatch):
    """What would fail only after all of rejection sampling's sampling (whose answers were
    then lost) is refused before it: a pool directory without answers, a held-out prompt
    too long for the context, the code reward on prompts without a reference answer."""
    import json

    from procs import load_experiment

    from llama_jax import rlhf
    from llama_jax.data.sources import DataError
    from llama_jax.stages import RejectionSamplingStage
    from llama_jax.train import RunError

    ref_dir, _ = reference_run
    monkeypatch.setattr(rlhf, "sample_answers", lambda *a, **k: pytest.fail("sampled before the check"))
    ask = tmp_path / "ask.jsonl"
    ask.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}) + "\n"
                           for i in range(3)))
    c = load_experiment("rejection_sampling").get_config("tiny")
    c.init_from, c.rlhf.reward_model, c.rlhf.safety_reward_model = ref_dir, "code", ""
    c.rlhf.prompts, c.seq_len, c.rlhf.max_new_tokens = str(ask), 64, 16
    c.rlhf.pool = str(tmp_path / "typo_rs")
    with pytest.raises(RunError, match=r"config.rlhf.pool: .*typo_rs holds no data/rs_train.jsonl"):
        RejectionSamplingStage().prepare(c, str(tmp_path / "a"))
    c.rlhf.pool = ""
    with pytest.raises(RunError, match=r"ask.jsonl:1: no \"reference\" answer, which rlhf.reward_model=code checks "
                                       r"answers against \(3 of 3 prompts lack one\)"):
        RejectionSamplingStage().prepare(c, str(tmp_path / "b"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 80}]}) + "\n")
    c.rlhf.eval_prompts = str(long)
    with pytest.raises(DataError, match=r"long.jsonl:1: prompt has \d+ tokens, more than the 48 that config.seq_len "
                                        r"- config.rlhf.max_new_tokens leaves"):
        RejectionSamplingStage().prepare(c, str(tmp_path / "c"))


def test_rejection_samplings_first_and_kept_samples_are_compared_on_the_same_prompts(tmp_path, reference_run,
                                                                                     monkeypatch):
    """The report's first-sample and kept-sample means are over the prompts that keep a
    sample (a finished one): prompt b's samples are both unfinished, so its wrong first
    sample does not pull the first-sample numbers below the kept ones (0.5 against 1.0
    over different prompts)."""
    from procs import load_experiment

    from llama_jax import rlhf, stages

    ref_dir, _ = reference_run
    ask = tmp_path / "ask.jsonl"
    ask.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "reference": "4"}) + "\n"
                           for q in ("a", "b")))
    texts = {"a": [("4", True), ("5", True)], "b": [("5", False), ("4", False)]}
    monkeypatch.setattr(rlhf, "sample_answers", lambda cfg, params, tok, prompts, *a, **k: [
        [rlhf.Sample(t, [5], [-1.0], done) for t, done in texts[p.messages[-1]["content"]]] for p in prompts])
    monkeypatch.setattr(stages, "policy_quality", lambda *a, **k: {})
    c = load_experiment("rejection_sampling").get_config("tiny")
    c.init_from, c.rlhf.reward_model, c.rlhf.safety_reward_model = ref_dir, "code", ""
    c.rlhf.prompts, c.rlhf.eval_prompts, c.seq_len, c.rlhf.max_new_tokens = str(ask), "", 64, 16
    c.rlhf.num_samples, c.rlhf.selection_beta = 2, 0.0
    stage = stages.RejectionSamplingStage()
    (tmp_path / "rs" / "data").mkdir(parents=True)  # (the run makes its workdir)
    stage.prepare(c, str(tmp_path / "rs"))
    report = json.load(open(tmp_path / "rs" / "rejection_sampling.json"))
    assert report["prompts"] == 2 and report["prompts_without_a_finished_sample"] == 1
    assert report["mean_reward_first_sample"] == report["mean_reward_best_sample"] == 1.0
    assert report["accuracy_first_sample"] == report["accuracy_best_sample"] == 1.0


def test_pooling_rescores_earlier_iterations_answers_with_this_iterations_reward_models(tmp_path):
    """Rejection sampling's pool: an earlier iteration's best answer to one of this
    iteration's prompts replaces this iteration's when *this* iteration's reward models
    score it higher; the score an older reward model wrote into the earlier file (high
    here, on purpose) does not decide. Prompts only the earlier iteration had are not
    carried over."""
    import json

    from llama_jax import stages

    def dialog(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    earlier = tmp_path / "rs1"
    (earlier / "data").mkdir(parents=True)
    old = [{"messages": dialog("q1", "old good"), "is_safety": True, "reward": 0.1},  # flags of another time
           {"messages": dialog("q2", "old bad"), "is_safety": False, "reward": 0.99},
           {"messages": dialog("q3", "only earlier"), "is_safety": False, "reward": 0.9}]
    (earlier / "data" / "rs_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    records = {json.dumps(dialog(q, "new")[:-1]): {"messages": dialog(q, "new"), "is_safety": safe, "reward": 0.5}
               for q, safe in (("q1", False), ("q2", True))}
    seen = {}

    def rms(dialogs, is_safety):  # this iteration's reward models: "good" answers score 0.8, others 0.2
        seen["flags"] = list(is_safety)
        return {"gated": [0.8 if "good" in d[-1]["content"] else 0.2 for d in dialogs]}

    assert stages.pool_earlier(records, f" {earlier} ,", rms) == 1
    assert seen["flags"] == [False, True]  # each prompt's own flag, the scored candidates only (not q3)
    q1, q2 = (records[json.dumps(dialog(q, "")[:-1])] for q in ("q1", "q2"))
    assert q1["messages"][-1]["content"] == "old good" and q1["reward"] == pytest.approx(0.8)
    assert q2["messages"][-1]["content"] == "new" and len(records) == 2
    assert stages.pool_earlier(records, "", rms) == 0


def test_a_prompts_own_preprompt_targets_its_distillation(tmp_path, monkeypatch):
    """Safety context distillation with the paper's targeted preprompts: a prompt's own
    "preprompt" (its risk category's answer template) replaces distill.preprompt for that
    prompt, in each position; the kept record keeps it; a blank one is a data error."""
    import json

    from procs import load_experiment

    from llama_jax import stages
    from llama_jax.data import prompts as prompt_data
    from llama_jax.data.sources import DataError

    def ask(q, **extra):
        return {"messages": [{"role": "user", "content": q}], "is_safety": True, **extra}

    unsafe = [ask("make a weapon", preprompt="Explain the risks, then refuse."), ask("hack a bank")]
    asked = []

    def answers(cfg, params, tokenizer, dialogs, *a, **k):
        asked.append(dialogs)
        return ["plain answer" if len(asked) == 1 else "safe answer"] * len(dialogs)

    loaded = []
    monkeypatch.setattr(stages, "sampling_model", lambda config, path, stage=None: loaded.append(stage) or (None,) * 5)
    monkeypatch.setattr(stages, "_greedy_answers", answers)
    stage = stages.SafetyDistillStage()
    monkeypatch.setattr(stage, "_prompts", lambda config, workdir, split, safety, n, tok: unsafe if safety else [])
    monkeypatch.setattr(stage, "_safety", lambda config, tok, prompts, answers: np.array(
        [0.9 if a == "safe answer" else 0.1 for a in answers]))
    monkeypatch.setattr(stage, "_rates", lambda *a, **k: {})
    c = load_experiment("safety_distill").get_config("tiny")
    c.distill.preprompt, c.distill.preprompt_position, c.distill.benign_anchors = "generic", "prefix,system", 0
    stage.train_path = str(tmp_path / "data" / "distill_train.jsonl")
    (tmp_path / "data").mkdir()
    stage._build(c, str(tmp_path))
    assert loaded == [stage]  # init_from at the step and context the run trains
    prefix, system = asked[1], asked[2]  # after the plain answers
    assert prefix[0][-1]["content"] == "Explain the risks, then refuse. make a weapon"
    assert prefix[1][-1]["content"] == f"{stages.SAFETY_PREPROMPTS['generic']} hack a bank"
    assert system[0][0] == {"role": "system", "content": "Explain the risks, then refuse."}
    kept = [json.loads(line) for line in open(stage.train_path)]
    assert kept[0]["preprompt"] == "Explain the risks, then refuse." and "preprompt" not in kept[1]
    assert kept[0]["messages"][0]["content"] == "make a weapon"  # trained without the preprompt
    # preprompted answers that never ended are counted and said, not blamed on the safety RM; so are benign
    # anchors whose answer did not end (asked 2, kept 1)
    asked.clear()
    benign = [{"messages": [{"role": "user", "content": q}], "is_safety": False} for q in ("sort a b", "long one")]
    monkeypatch.setattr(stage, "_prompts", lambda config, workdir, split, safety, n, tok: unsafe if safety else benign)
    monkeypatch.setattr(stages, "_greedy_answers", lambda cfg, params, tok, dialogs, *a, **k: asked.append(dialogs) or [
        "plain answer" if len(asked) == 1 else None if "hack" in d[-1]["content"] or "long" in d[-1]["content"]
        else "safe answer" for d in dialogs])
    c.distill.benign_anchors = 2
    (tmp_path / "again" / "data").mkdir(parents=True)
    stage.train_path = str(tmp_path / "again" / "data" / "distill_train.jsonl")
    stage._build(c, str(tmp_path / "again"))
    report = json.load(open(tmp_path / "again" / "safety_distill.json"))
    assert report["kept"] == 1 and report["unanswered"] == 1 and len(open(stage.train_path).readlines()) == 2
    assert (report["benign_anchors"], report["benign_anchors_kept"]) == (2, 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ask("x", preprompt=" ")) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: field 'preprompt' must be a non-empty string"):
        prompt_data.check(str(bad))


def test_the_reward_models_held_out_pairs_are_cut_at_the_runs_seq_len(monkeypatch):
    """The RM's evaluation scores every held-out pair cut at the run's seq_len (as training
    cut them), and logs the overall accuracy of those pairs beside Table 8's buckets."""
    import types

    from llama_jax import evaluate, stages

    seen = []
    monkeypatch.setattr(evaluate, "reward_accuracy",
                        lambda *a, **k: seen.append(k) or {"accuracy": 0.25, "better": 0.5, "pairs": 4})
    stage = stages.RewardModelStage()
    stage.eval_path, stage.policy_eval_path = "held.jsonl", ""
    out = stage.evaluate_extra(types.SimpleNamespace(seq_len=77), types.SimpleNamespace(config=None), None, None,
                               None, None, {})
    assert seen == [{"seq_len": 77}] and out == {"eval_better": 0.5, "eval_accuracy_all_pairs": 0.25}


def test_a_stage_reports_after_only_from_its_final_evaluation(tmp_path, monkeypatch):
    """A report's "after" is the finished model's: a mid-run evaluation (a PPO run killed
    after one left "after" with validation numbers alone) does not write it."""
    from llama_jax import stages

    monkeypatch.setattr(stages, "gatt_adherence", lambda *a: {4: 0.5})
    monkeypatch.setattr(stages, "gatt_plain_accuracy", lambda *a: 0.75)
    stage = stages.GAttStage()
    stage.workdir = str(tmp_path)
    for phase in ("start", "during"):
        stage.eval_phase = phase
        assert stage.evaluate_extra(None, types.SimpleNamespace(config=None), None, None, None, None, {}) == {
            "eval_adherence_turn_4": 0.5, "eval_plain_accuracy": 0.75}
        assert not os.path.exists(tmp_path / "gatt.json")
    stage.eval_phase = "end"
    stage.evaluate_extra(None, types.SimpleNamespace(config=None), None, None, None, None, {})
    assert json.load(open(tmp_path / "gatt.json")) == {"after": {"4": 0.5}, "after_plain_accuracy": 0.75}
    rs = stages.RejectionSamplingStage()  # its policy's held-out reward and accuracy
    rs.workdir = str(tmp_path)
    monkeypatch.setattr(stages.SFTStage, "evaluate_extra", lambda *a: {"eval_exact_match": 0.5})
    monkeypatch.setattr(stages, "reward_models", lambda *a: None)
    monkeypatch.setattr(stages, "_rlhf_eval_prompts", lambda *a: "held.jsonl")
    monkeypatch.setattr(stages, "policy_quality", lambda *a, **k: {"eval_reward": 0.75})
    for phase, written in (("during", False), ("end", True)):
        rs.eval_phase = phase
        assert rs.evaluate_extra(None, types.SimpleNamespace(config=None), None, None, None, None, {}) == {
            "eval_exact_match": 0.5, "eval_reward": 0.75}
        assert os.path.exists(tmp_path / "rejection_sampling.json") == written
    assert json.load(open(tmp_path / "rejection_sampling.json")) == {"after": {"eval_reward": 0.75}}
    distill = stages.SafetyDistillStage()
    distill.workdir = str(tmp_path)
    monkeypatch.setattr(distill, "_rates", lambda *a: {"violation_rate": 0.25})
    for phase, written in (("during", False), ("end", True)):
        distill.eval_phase = phase
        assert distill.evaluate_extra(None, types.SimpleNamespace(config=None), None, None, None, None, {}) == {
            "eval_violation_rate": 0.25}
        assert os.path.exists(tmp_path / "safety_distill.json") == written


def test_every_process_reads_the_leads_report_for_its_metrics(tmp_path, monkeypatch):
    """The paired changes (eval_change_*) are computed from the report the lead wrote at
    the start: every process gets the lead's copy, so an early-stopping metric among them
    exists on all processes (it existed on the lead only, and process 1 failed)."""
    from llama_jax import distributed, stages

    lead = {"before_per_prompt": {"eval_": {"p": [1.0]}}}
    monkeypatch.setattr(stages.jax, "process_index", lambda: 1)  # not the lead: it reads nothing itself
    monkeypatch.setattr(distributed, "allgather_json", lambda mine: [lead, mine])
    assert stages.read_report(str(tmp_path), "ppo.json") == {}
    assert stages.read_report(str(tmp_path), "ppo.json", shared=True) == lead


def test_a_stage_samples_init_from_at_the_step_and_context_the_run_trains(reference_run):
    """A stage that samples before it trains (rejection sampling, GAtt, distillation, the
    RM's policy pairs) loads `init_from` at the step the run starts from (not its latest,
    which a run still saving may have moved on) and with the run's longer context (it
    sampled at the checkpoint's, so prompts the run allows did not fit: a traceback, or
    every GAtt answer dropped)."""
    import types

    from procs import load_experiment

    from llama_jax import checkpoint as ckpt
    from llama_jax import stages
    from llama_jax.model import LlamaConfig

    workdir, _ = reference_run
    c = load_experiment("gatt").get_config("tiny")
    c.init_from = workdir
    stored = ckpt.model_config(ckpt.read_meta(workdir)[1])
    stage = types.SimpleNamespace(init_step=9, run_config=LlamaConfig(**{**stored.to_dict(), "max_seq_len": 1024}))
    cfg, params, _, _, _ = stages.sampling_model(c, workdir, stage)
    at_9 = ckpt.load_model(workdir, 9)[1]
    assert cfg.max_seq_len == 1024 and stored.max_seq_len == 512
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]), np.asarray(at_9["norm"]["scale"]))
    latest = ckpt.load_model(workdir)[1]  # step 12
    assert not np.array_equal(np.asarray(at_9["norm"]["scale"]), np.asarray(latest["norm"]["scale"]))
    assert stages.sampling_model(c, workdir)[0].max_seq_len == stored.max_seq_len  # no stage: the checkpoint's own


def test_a_reward_model_asked_to_score_longer_rows_than_it_trained_on_is_warned(tmp_path, monkeypatch, capsys):
    """An RLHF stage whose rows are longer than its reward model ever trained on scores
    positions the RM never learnt to score: said when the RMs load (its config.json)."""
    import json
    import types

    from procs import load_experiment

    from llama_jax import rlhf, stages

    monkeypatch.setattr(rlhf, "RewardModels", lambda *a, **k: "loaded")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"seq_len": 64}))
    c = load_experiment("ppo").get_config("tiny")
    c.rlhf.reward_model, c.rlhf.safety_reward_model, c.seq_len = str(tmp_path / "rm"), "", 128
    assert stages.reward_models(types.SimpleNamespace(rms=None), c, None) == "loaded"
    assert capsys.readouterr().out == (f"warning: reward model {tmp_path / 'rm'} trained on rows of 64 tokens; this "
                                       "stage scores dialogs of up to config.seq_len 128\n")
    c.seq_len = 64
    stages.reward_models(types.SimpleNamespace(rms=None), c, None)
    assert capsys.readouterr().out == ""


def test_a_run_started_from_python_says_which_model_settings_init_from_makes_unused(tmp_path, reference_run,
                                                                                    capsys):
    """From Python (no command line to tell what was changed), config.model fields that
    init_from's architecture replaces are named in a note rather than dropped silently;
    `overrides` makes main.run check them as the command line's are."""
    from procs import load_experiment

    from llama_jax import main, train
    from llama_jax.stages import SFTStage

    workdir, _ = reference_run
    c = load_experiment("sft").get_config("tiny")
    c.init_from, c.model.dim, c.model.n_layers = workdir, 96, 3
    cfg = train.run_model(c, SFTStage(), None)
    said = capsys.readouterr().out
    assert cfg.dim == 48 and "the run trains its model; config.model's dim 96 (it has 48), n_layers 3 (it has " \
        "2)" in said and "are not used" in said, said
    train.run_model(c, SFTStage(), {})  # the command line's overrides, none of them model fields: no note
    assert capsys.readouterr().out == ""
    with pytest.raises(train.RunError, match=r"--config.model.dim=96 \(it has 48\) cannot apply"):
        main.run(c, str(tmp_path / "sft"), overrides={"model.dim": 96})
    assert not (tmp_path / "sft").exists()


def test_reward_models_take_one_safety_flag_a_dialog():
    """`rms(dialogs, is_safety)`: one True/False a dialog. A single flag for two dialogs
    (numpy broadcast it: both gated by the safety score), None (read as all False) or
    strings ("no" read as True) are a ValueError, as a list of the wrong length was."""
    import numpy as np

    from llama_jax import rlhf

    dialogs = [[{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]] * 2
    code = rlhf.CodeReward([])
    code.references = {}
    code._reference = lambda prompt: {"reference": "3"}
    assert list(code(dialogs, [False, np.bool_(True)])["gated"]) == [1.0, 0.0]  # tagged: not a refusal
    for bad in ([True], None, ["no", "no"], [1, 0], True):
        with pytest.raises(ValueError, match=r"is_safety: give one True/False a dialog \(2 dialogs\)"):
            code(dialogs, bad)


def test_sums_over_processes_and_what_a_stage_reports_of_its_own_data(monkeypatch):
    """sum_over_processes adds every process's row (the unigram baseline's counts); an SFT
    evaluation with no dialog to answer reports no exact match (not None as a metric)."""
    import types

    from jax.experimental import multihost_utils

    from llama_jax import distributed, stages

    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, 2 * x]))
    assert distributed.sum_over_processes(np.array([1, 2])).tolist() == [3, 6]
    monkeypatch.setattr(stages, "exact_match", lambda *a, **k: None)
    sft = stages.SFTStage()
    sft.eval_path = "held.jsonl"
    c = types.SimpleNamespace(eval_exact_match=4, eval_max_new_tokens=8)
    assert sft.evaluate_extra(c, types.SimpleNamespace(config=None), None, None, None, None, {}) == {}


def test_greedy_answers_pad_rows_and_prompts_to_share_decode_programs(monkeypatch):
    """A chunk's rows are padded to a power of two and its prompts to the call's longest
    (GAtt compiled a decode program per chunk size and prompt length)."""
    from llama_jax import generate as gen
    from llama_jax import tokenizer as tk
    from llama_jax.model import LlamaConfig
    from llama_jax.stages import _greedy_answers

    class Tok:
        eos_id = tk.EOS_ID
        answer = tk.Tokenizer.answer

        def encode_dialog(self, dialog):
            return [1] * (1 + len(dialog[-1]["content"]))

        def decode(self, ids):
            return " ".join(map(str, ids))

    seen = []

    def fake(cfg, params, prompts, n, **kw):
        seen.append((len(prompts), kw.get("pad_to")))
        return gen.Generation([[7, tk.EOS_ID]] * len(prompts), [[0.0]] * len(prompts))

    monkeypatch.setattr(gen, "generate", fake)
    dialogs = [[{"role": "user", "content": "x" * k}] for k in (1, 2, 3)]
    assert _greedy_answers(LlamaConfig.tiny(), None, Tok(), dialogs, 3, rows=4) == ["7"] * 3
    assert seen == [(4, 4)]  # 3 rows padded to 4, prompts to the longest (4 tokens)


def test_the_reward_models_a_stage_checks_before_making_data_are_those_it_loads():
    """rlhf.reward_model=code loads no model, so the preset's safety RM path is not checked
    (the code check ran with runs/rm_safety absent); distillation loads the safety RM alone."""
    from procs import load_experiment

    from llama_jax import stages

    c = load_experiment("ppo").get_config("tiny")
    assert stages.reward_model_paths(c) == {"rlhf.safety_reward_model": ("runs/rm_safety", "score"),
                                            "rlhf.reward_model": ("runs/rm", "score")}
    c.rlhf.reward_model = "code"
    assert stages.reward_model_paths(c) == {}
    assert stages.reward_model_paths(c, safety_only=True) == {"rlhf.safety_reward_model": ("runs/rm_safety", "score")}
