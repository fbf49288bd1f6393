"""Every experiment config loads for every argument it documents, converts to a valid
LlamaConfig, and opens with a docstring that gives its command."""

import os

import pytest
from procs import load_experiment

from llama_jax import train
from llama_jax.configs import to_llama_config
from llama_jax.stages import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = {"pretrain": ["tiny", "7b", "13b", "34b", "70b"], "sft": ["tiny", "7b", "70b"],
        "reward_model": ["tiny", "safety_tiny", "7b", "70b"], "dpo": ["tiny", "7b", "70b"],
        "rejection_sampling": ["tiny", "7b", "70b"], "ppo": ["tiny", "7b", "13b", "34b", "70b"],
        "gatt": ["tiny", "7b", "70b"], "safety_distill": ["tiny", "7b", "70b"]}


load = load_experiment


@pytest.mark.parametrize("name", sorted(ARGS))
def test_experiment_configs_load(name):
    module = load(name)
    assert "python -m llama_jax.main --config=experiments/" in module.__doc__
    for arg in ARGS[name]:
        c = module.get_config(arg)
        assert c.stage == name
        cfg = to_llama_config(c.model)
        train.check_config(c, STAGES[name]())  # as a run (and the recipe, and a sweep) checks it at its start
        if arg == "70b" and name == "pretrain":
            assert cfg.num_params() == 68_976_648_192 and c.batch_size * c.seq_len == 4_194_304
        if arg != "tiny" and arg != "safety_tiny":
            assert cfg.dtype == "bfloat16"
        # paper scale samples from a copy gathered over fsdp (paper 3.2.3); the toy from the sharded model
        assert c.mesh.gather_for_generation == (arg not in ("tiny", "safety_tiny"))
    with pytest.raises(ValueError, match="unknown arg 'huge'"):
        module.get_config("huge")
    if name == "sft":
        assert load(name).get_config("7b").epochs == 2.0 and load(name).get_config("tiny").epochs == 0.0
    if name == "reward_model":
        assert load(name).get_config("70b").optimizer.learning_rate == 5e-6
        assert load(name).get_config("safety_tiny").reward.safety_weight == 1.0
        c = load(name).get_config("7b")  # warm-up: 3% of total_steps, at least 5, of an override too
        assert (c.total_steps, c.optimizer.warmup_steps, c.epochs) == (5701, 171, 1.0)  # 1 epoch of one's data
        c.total_steps = 200
        assert c.optimizer.warmup_steps == 6
        c.total_steps = 100
        assert c.optimizer.warmup_steps == 5
    if name == "ppo":  # the paper's PPO settings
        for arg, beta in (("7b", 0.01), ("13b", 0.01), ("34b", 0.005), ("70b", 0.005)):
            c = load(name).get_config(arg)
            assert (c.ppo.beta, c.ppo.clip_eps, c.ppo.rollout_batch, c.batch_size) == (beta, 0.2, 512, 64)
            assert (c.ppo.samples_per_prompt, c.ppo.epochs) == (1, 1)  # one answer per prompt, one pass
            assert c.ppo.ref_logprob_weight == 0.0  # the reward is the gated score alone
            opt = c.optimizer
            assert (opt.learning_rate, opt.schedule, opt.weight_decay) == (1e-6, "constant", 0.1)
            assert (opt.b1, opt.b2, opt.eps, opt.clip_norm) == (0.9, 0.95, 1e-5, 1.0)
            assert c.rlhf.safety_threshold == 0.15
            stopper = train.EarlyStopping.from_config(c)  # early-stopped on held-out prompts, the best kept
            assert stopper.metric == "val_reward" and c.rlhf.val_prompts
        tiny = train.EarlyStopping.from_config(load(name).get_config("tiny"))
        assert tiny.guards == ["val_true_accuracy", "val_sampled_true_accuracy"]
        assert tiny.metric == "val_sampled_reward"  # the toy keeps the best expected reward, PPO's objective


def test_ppo_critic_schedules_from_the_config():
    """ppo.value_learning_rate and ppo.value_warmup_iterations become the optimizer's
    parameter groups: the value head at its own LR from step 0; the rest at 0 for the
    warm-up iterations' steps (rollout_batch / batch_size each), then the policy's LR."""
    from llama_jax.stages import PPOStage

    c = load("ppo").get_config("tiny")  # rollouts of 64 in mini-batches of 16: 4 steps an iteration
    lr = PPOStage().learning_rates(c)
    assert float(lr["value_head"](0)) == pytest.approx(1e-3)
    assert [float(lr["*"](s)) for s in (0, 7)] == [0.0, 0.0]  # 2 value-only iterations
    assert float(lr["*"](8)) == pytest.approx(1e-5) == float(lr["*"](c.total_steps))
    c.ppo.epochs = 3  # three passes over each iteration's rollouts: 12 steps an iteration
    lr = PPOStage().learning_rates(c)
    assert [float(lr["*"](s)) for s in (0, 23, 24)] == [0.0, 0.0, pytest.approx(1e-5)]
    c.ppo.value_warmup_iterations, c.ppo.value_learning_rate = 0, 0.0
    assert PPOStage().learning_rates(c) == {}  # one schedule for everything, as before


# two prompts x two answers of two tokens each, the RM preferring each prompt's second answer;
# the rows' log-probabilities tell them apart after the rollout's shuffle
_STUB_LOGP = [[-9.0, -0.5, -0.5, 0.0], [-9.0, -1.0, -2.0, 0.0], [-9.0, -2.0, 0.0, 0.0], [-9.0, -1.5, -0.5, 0.0]]


def _stub_rollout_advantages(c, values=None, answers=None, answer=None, stages_out=None, ref_logp=None, gated=None,
                             returns_out=None):
    """[4, 4] advantages of one PPO rollout of `c` (4 rollouts, 2 per prompt, one
    mini-batch) with generation and scoring stubbed: logp = _STUB_LOGP, ref_logp the same
    unless given, the value head's outputs `values` (zeros by default), gated scores
    `gated` (0.5 / 0.8 per prompt by default); rows in the stub's order, zero outside the
    answer tokens (columns 1-2). The returns, in the same order, go to `returns_out`."""
    import types

    import numpy as np

    from llama_jax.stages import PPOStage

    c.ppo.rollout_batch, c.ppo.samples_per_prompt, c.batch_size = 4, 2, 4
    mask = np.array([[0.0, 1.0, 1.0, 0.0]] * 4, np.float32)
    logp = np.array(_STUB_LOGP, np.float32)
    values = np.zeros((4, 4), np.float32) if values is None else values
    rows = {"tokens": np.ones((4, 4), np.int32), "targets": np.ones((4, 4), np.int32), "loss_mask": mask,
            "segment_ids": np.ones((4, 4), np.int32), "positions": np.tile(np.arange(4, dtype=np.int32), (4, 1))}
    scored = {"gated": np.array([0.5, 0.8, 0.5, 0.8] if gated is None else gated), "texts": ["a", "b", "c", "d"]}
    ref_logp = logp if ref_logp is None else np.asarray(ref_logp, np.float32)

    class Prompts:
        position = 0

        def __next__(self):
            return [types.SimpleNamespace(record={}, tokens=[1]) for _ in range(2)]

    stage = PPOStage()
    stage.config, stage.ready = c, True
    # (a tokenizer for rollout_unfinished: by default every answer here ends with EOS, id 2)
    stage.runtime = types.SimpleNamespace(tokenizer=types.SimpleNamespace(
        answer=answer or (lambda t: ("x", len(t))), eos_id=2))
    stage._answers = lambda *args: answers or [[1, 2]] * 4
    if stages_out is not None:
        stages_out.append(stage)
    stage._evaluate_answers = lambda *args: (rows, scored, logp, ref_logp, values)
    (batch,) = stage._rollout(Prompts(), None)  # one mini-batch of all 4, in a shuffled order
    order = [int(np.flatnonzero((logp == lp).all(axis=1))[0]) for lp in batch["old_logp"]]
    adv = np.zeros((4, 4), np.float32)
    adv[order] = batch["advantages"] * batch["loss_mask"]
    if returns_out is not None:
        ret = np.zeros((4, 4), np.float32)
        ret[order] = batch["returns"]
        returns_out.append(ret)
    return adv


def test_ppo_rollout_advantages_and_returns_are_rlhfs_composition():
    """The stage's rollout against rlhf's pieces composed by hand, with every input live:
    log pi != log pi_0 (KL penalty beta 0.05), nonzero values, gated scores that differ
    across prompts ([.5, .8] and [.9, .95], 2 answers each): the score is logit(R_c)
    centred per prompt then whitened, the rewards -beta (log pi - log pi_0) per token
    plus the score at the last, and GAE over the values gives advantages (whitened) and
    returns."""
    import jax.numpy as jnp
    import numpy as np

    from llama_jax import rlhf

    c = load("ppo").get_config("tiny")
    c.ppo.beta = 0.05
    logp = np.array(_STUB_LOGP, np.float32)
    ref = logp + np.array([[0, .3, -.4, 0], [0, -.2, .5, 0], [0, .1, .1, 0], [0, -.6, .2, 0]], np.float32)
    gated = np.array([.5, .8, .9, .95])
    values = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    returns = []
    adv = _stub_rollout_advantages(c, values, ref_logp=ref, gated=gated, returns_out=returns)
    mask = jnp.asarray([[0.0, 1.0, 1.0, 0.0]] * 4)
    score = rlhf.ppo_score(jnp.asarray(gated), jnp.asarray(ref), mask, 2)
    rewards = rlhf.token_rewards(score, jnp.asarray(logp), jnp.asarray(ref), mask, 0.05)
    want_adv, want_ret = rlhf.ppo_advantages(rewards, jnp.asarray(values), mask, jnp.ones(4), float(c.ppo.gamma),
                                             float(c.ppo.lam))
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(returns[0], want_ret, atol=1e-5)
    # the score is centred per prompt: each prompt's second answer is the better one, by logit(R_c)
    np.testing.assert_allclose(np.asarray(score).reshape(2, 2).sum(axis=1), 0.0, atol=1e-5)


def test_ppo_counts_unfinished_rollouts_as_every_stage_does():
    """rollout_unfinished: an answer that ended with EOS, or with a chat tag after some
    text (Tokenizer.answer cut it), is finished, as rejection sampling and GAtt count it;
    one cut at max_new_tokens is not."""
    for answers, answer, unfinished in (([[1, 2]] * 4, None, 0.0),  # EOS
                                        ([[1, 5]] * 4, lambda t: ("x", 1), 0.0),  # a tag after "x": finished
                                        ([[1, 5]] * 4, None, 1.0)):  # cut at the budget
        made = []
        _stub_rollout_advantages(load("ppo").get_config("tiny"), answers=answers, answer=answer, stages_out=made)
        assert made[0].last["rollout_unfinished"] == unfinished


def test_ppo_rollout_rewards_the_reference_log_probability_when_configured():
    """ppo.ref_logprob_weight reaches the rollout's advantages: two prompts x two answers
    (stubbed generation and scores), the RM preferring each prompt's second answer; with
    weight 2 the first prompt's first answer, 2 nats likelier under the reference, wins."""
    c = load("ppo").get_config("tiny")
    c.ppo.beta = 0.0  # the score alone (logp = ref_logp anyway)

    def answer_advantages(weight):
        c.ppo.ref_logprob_weight = weight
        return _stub_rollout_advantages(c).sum(axis=1)

    paper = answer_advantages(0.0)
    assert paper[1] > paper[0] and paper[3] > paper[2]  # the RM's preference
    rbon = answer_advantages(2.0)
    assert rbon[0] > rbon[1] and rbon[3] > rbon[2]  # 2 * 2 nats outweigh ln 4 on the first prompt only


def test_ppo_without_a_critic_advantages_are_the_centred_returns(tmp_path):
    """ppo.critic none: the value head's outputs are ignored and every answer token's
    advantage is its answer's return-to-go, centred on the prompt's answers and whitened:
    with beta 0 and the RM preferring each prompt's second answer, exactly -1 / +1 at every
    token (the stubbed values make the value-head advantages vary by token);
    ppo.negative_weight scales the -1s. The value loss is off, no value-only warm-up, and
    settings that cannot work are refused."""
    import numpy as np

    from llama_jax.stages import PPOStage
    from llama_jax.train import RunError

    c = load("ppo").get_config("tiny")
    c.ppo.beta = 0.0
    values = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    c.ppo.critic = "none"
    np.testing.assert_allclose(_stub_rollout_advantages(c, values), [[0, -1, -1, 0], [0, 1, 1, 0]] * 2, atol=1e-5)
    c.ppo.negative_weight = 0.0  # positive-sample reinforcement: the answers below their prompt's mean drop out
    np.testing.assert_allclose(_stub_rollout_advantages(c, values), [[0, 0, 0, 0], [0, 1, 1, 0]] * 2, atol=1e-5)
    c.ppo.negative_weight = 0.5
    np.testing.assert_allclose(_stub_rollout_advantages(c, values), [[0, -.5, -.5, 0], [0, 1, 1, 0]] * 2, atol=1e-5)
    c.ppo.negative_weight = 1.0
    c.ppo.critic = "value_head"
    with_critic = _stub_rollout_advantages(c, values)
    assert not np.allclose(with_critic[:, 1], with_critic[:, 2])  # GAE reads the values
    c.ppo.critic = "none"
    assert PPOStage().objective(c).keywords["vf_coef"] == 0.0
    assert "*" not in PPOStage().learning_rates(c)  # the policy learns from the first step
    c.init_from, c.rlhf.reward_model = str(tmp_path / "policy"), "code"
    c.ppo.critic = "gae"
    with pytest.raises(RunError, match=r"config.ppo.critic 'gae'"):
        PPOStage().check(c)
    c.ppo.critic, c.ppo.negative_weight = "none", -1.0
    with pytest.raises(RunError, match=r"config.ppo.negative_weight -1.0 is negative"):
        PPOStage().check(c)
    c.ppo.negative_weight = 1.0
    c.ppo.critic, c.ppo.samples_per_prompt = "none", 1
    with pytest.raises(RunError, match=r"critic none .*samples_per_prompt >= 2 \(got 1\)"):
        PPOStage().check(c)


def test_rejection_sampling_selection_settings_and_their_errors(tmp_path):
    """The presets keep the paper's argmax of the reward; the tiny one regularises it by
    the policy's log-probability (RBoN) and also samples held-out answers. Negative
    values are refused before anything is sampled, naming the field."""
    from llama_jax.stages import PPOStage, RejectionSamplingStage, SafetyDistillStage
    from llama_jax.train import RunError

    assert load("rejection_sampling").get_config("70b").rlhf.selection_beta == 0.0
    c = load("rejection_sampling").get_config("tiny")
    assert (c.rlhf.selection_beta, c.rlhf.eval_samples) == (2.0, 2)
    c.rlhf.selection_beta = -1.0
    with pytest.raises(RunError, match=r"config.rlhf.selection_beta -1.0: must be a finite number >= 0"):
        RejectionSamplingStage().check(c)
    c.rlhf.selection_beta, c.rlhf.eval_samples = 2.0, -1
    with pytest.raises(RunError, match=r"config.rlhf.eval_samples -1 is negative"):
        RejectionSamplingStage().check(c)
    p = load("ppo").get_config("tiny")
    p.rlhf.eval_samples = -2
    with pytest.raises(RunError, match=r"config.rlhf.eval_samples -2 is negative"):
        PPOStage().check(p)
    p.rlhf.eval_samples, p.ppo.samples_per_prompt = 2, 3  # 64 rollouts are not 3 answers to each of n prompts
    with pytest.raises(RunError, match=r"config.ppo.samples_per_prompt 3 must be >= 1 and divide "
                                       r"config.ppo.rollout_batch 64"):
        PPOStage().check(p)
    p.ppo.samples_per_prompt, p.rlhf.temperature = 4, 0.0
    with pytest.raises(RunError, match=r"config.rlhf.temperature 0.0: PPO samples its rollouts"):
        PPOStage().check(p)
    p.rlhf.temperature, p.rlhf.top_p = 1.0, 0.9
    with pytest.raises(RunError, match=r"config.rlhf.top_p 0.9: PPO's ratios and KL penalty"):
        PPOStage().check(p)
    p.rlhf.top_p, p.ppo.ref_logprob_weight = 1.0, -1.0
    with pytest.raises(RunError, match=r"config.ppo.ref_logprob_weight -1.0 is negative"):
        PPOStage().check(p)
    budget, p.ppo.ref_logprob_weight, p.rlhf.max_new_tokens = p.rlhf.max_new_tokens, 0.0, p.seq_len
    with pytest.raises(RunError, match=rf"config.rlhf.max_new_tokens {p.seq_len} leaves no room for a prompt in "
                                       rf"config.seq_len {p.seq_len}"):  # said up front, not at the first prompt
        PPOStage().check(p)
    p.rlhf.max_new_tokens = budget
    # what GAtt and distillation do not read is refused, not ignored (they sample at their own settings)
    from llama_jax.stages import GAttStage

    g = load("gatt").get_config("tiny")
    GAttStage().check(g)
    g.rlhf.prompts, g.rlhf.eval_prompts = "", "synthetic"  # the toy prompts, said either way: not refused
    GAttStage().check(g)
    budget, g.eval_max_new_tokens = g.eval_max_new_tokens, g.seq_len
    with pytest.raises(RunError, match=rf"config.eval_max_new_tokens {g.seq_len} leaves no room for a prompt"):
        GAttStage().check(g)
    g.eval_max_new_tokens = budget
    g.rlhf.top_p = 0.9
    with pytest.raises(RunError, match=r"stage gatt samples each turn at rlhf.temperature .*: config.rlhf.top_p 0.9 "
                                       r"would be ignored"):
        GAttStage().check(g)
    d = load("safety_distill").get_config("tiny")
    d.rlhf.temperature = 0.7
    with pytest.raises(RunError, match=r"stage safety_distill answers greedily.*config.rlhf.temperature 0.7 would"):
        SafetyDistillStage().check(d)
    d.rlhf.temperature, d.eval_max_new_tokens = 1.0, d.seq_len
    with pytest.raises(RunError, match=r"config.eval_max_new_tokens \d+ leaves no room for a prompt"):
        SafetyDistillStage().check(d)
    p.ppo.ref_logprob_weight, p.rlhf.val_samples = 0.0, -2
    with pytest.raises(RunError, match=r"config.rlhf.val_samples -2 is below -1"):
        PPOStage().check(p)
    p.rlhf.val_samples = 0  # the tiny metric and guard read val_sampled_reward, val_sampled_true_accuracy
    with pytest.raises(RunError, match=r"config.early_stopping reads val_sampled_reward, val_sampled_true_accuracy, "
                                       r"but the validation "
                                       r"passes sample no answers \(rlhf.val_samples 0, rlhf.eval_samples 2\)"):
        PPOStage().check(p)
    d = load("safety_distill").get_config("tiny")
    d.distill.preprompt_position = "prefix,user"
    with pytest.raises(RunError, match=r"config.distill.preprompt_position: 'prefix,user' is not"):
        SafetyDistillStage().check(d)
    d.distill.preprompt_position = "prefix"  # the cases below each break one field of a valid config
    SafetyDistillStage().check(d)
    p.ppo.samples_per_prompt, p.ppo.epochs = 4, 0
    with pytest.raises(RunError, match=r"config.ppo.epochs: 0 .* must be >= 1"):
        PPOStage().check(p)
    p.ppo.epochs, p.rlhf.val_samples, c.rlhf.eval_samples = 1, -1, 2
    PPOStage().check(p)
    RejectionSamplingStage().check(c)
    # values no run could use, each named by its field before anything is sampled (NaN temperatures sampled
    # noise that was trained on; num_samples 0 and max_new_tokens 0 were tracebacks; a negative KL beta ran)
    nan = float("nan")
    for stage, config, field, value, words in (
            (RejectionSamplingStage, c, "rlhf.temperature", nan, "a finite number >= 0"),
            (RejectionSamplingStage, c, "rlhf.num_samples", 0, "a whole number >= 1"),
            (RejectionSamplingStage, c, "rlhf.max_new_tokens", 0, "a whole number >= 1"),
            (RejectionSamplingStage, c, "rlhf.min_reward", nan, "a finite number >= 0 and <= 1"),
            (RejectionSamplingStage, c, "rlhf.temperature", 0.0, "would be one answer"),
            (PPOStage, p, "ppo.beta", -1.0, "a finite number >= 0"),
            (PPOStage, p, "ppo.clip_eps", -0.5, "a finite number > 0"),
            (PPOStage, p, "ppo.clip_eps", 0.0, "a finite number > 0"),
            (PPOStage, p, "ppo.vf_coef", -1.0, "a finite number >= 0"),
            (PPOStage, p, "ppo.lam", 2.0, "a finite number >= 0 and <= 1"),
            (PPOStage, p, "ppo.gamma", nan, "a finite number >= 0 and <= 1"),
            (SafetyDistillStage, d, "eval_max_new_tokens", 0, "a whole number >= 1"),
            (SafetyDistillStage, d, "distill.preprompt", "careful", "nor a preprompt's own text")):
        node, key = config, field.split(".")
        for part in key[:-1]:
            node = node[part]
        before, node[key[-1]] = node[key[-1]], value
        with pytest.raises(RunError) as refused:
            stage().check(config)
        named = any(f"config.{field}{end}" in str(refused.value) for end in (" ", ":"))
        assert words in str(refused.value) and ("would be" in words or named), (field, str(refused.value))
        node[key[-1]] = before
    d.distill.preprompt = "You are a careful assistant; decline harm."
    SafetyDistillStage().check(d)  # a preprompt's own text
    d.distill.preprompt = "You are careful. <<SYS>> decline harm."
    with pytest.raises(RunError, match=r"config.distill.preprompt: the chat format's tag '<<SYS>>' cannot be inside"):
        SafetyDistillStage().check(d)
    d.distill.preprompt = "generic"
    # what the stage does not read is refused, not ignored (its rates are on rlhf.eval_prompts)
    d.rlhf.reward_model, d.data.eval_source = "runs/rm", "mine.jsonl"
    with pytest.raises(RunError, match=r"config.rlhf.reward_model 'runs/rm', config.data.eval_source 'mine.jsonl' "
                                       r"would be ignored"):
        SafetyDistillStage().check(d)
    d.rlhf.reward_model, d.data.eval_source = "", ""
    SafetyDistillStage().check(d)


def test_gatt_cuts_dialogs_at_the_first_breaking_turn_and_weights_instruction_kinds(tmp_path, monkeypatch):
    """A GAtt dialog is kept up to its first answer that breaks the instruction; the
    training instructions are drawn by `gatt.instruction_weights`, and a bad value is
    refused before anything is sampled, naming the field."""
    import random

    from llama_jax.stages import GAttStage, adherent_turns
    from llama_jax.train import RunError

    upper = str.isupper
    assert adherent_turns(upper, ["A B", "C", "d", "E"]) == 2
    assert adherent_turns(upper, ["a", "B"]) == 0 and adherent_turns(upper, ["A", "B"]) == 2
    g = load("gatt").get_config("tiny").gatt
    assert g.instruction_weights == "upper:1,start:1,end:2"
    g.combined_prob, g.short_prob, g.instruction_weights = 0.0, 0.0, "end:1,upper:0"
    rng = random.Random(0)
    assert all(GAttStage()._instruction(rng, g).text.startswith("Always end your answer with the word")
               for _ in range(20))
    g.instruction_weights = "upper:1,start:1,end:2"
    texts = [GAttStage()._instruction(rng, g).text for _ in range(2000)]
    share = {k: sum(t.startswith(f"Always {k}") for t in texts) / len(texts) for k in ("answer in upper", "start",
                                                                                        "end")}
    assert share["end"] == pytest.approx(0.5, abs=0.04) and share["answer in upper"] == pytest.approx(0.25, abs=0.04)
    c = load("gatt").get_config("tiny")
    for bad in ("end:2,lower:1", "end:x", "end:0"):
        c.gatt.instruction_weights = bad
        with pytest.raises(RunError, match=r"config.gatt.instruction_weights"):
            GAttStage().check(c)
    c.gatt.instruction_weights = ""
    for bad in ("2,x", "0,4", ""):  # refused before any sampling, not at the evaluation after it
        c.gatt.eval_turns = bad
        with pytest.raises(RunError, match=r"config.gatt.eval_turns"):
            GAttStage().check(c)
    c.gatt.eval_turns, c.gatt.max_turns = "2,4", 0
    with pytest.raises(RunError, match=r"config.gatt.max_turns 0: must be a whole number >= 1"):
        GAttStage().check(c)  # was "empty range for randrange()"
    c.gatt.max_turns, c.rlhf.prompts = 3, "mine.jsonl"  # GAtt synthesises its dialogs: own prompts were ignored
    with pytest.raises(RunError, match=r"reads no prompt or dialog files: config.rlhf.prompts 'mine.jsonl' would be "
                                       r"ignored. To train on GAtt dialogs of your own .* run stage sft on them with "
                                       r"--config.data.last_turn_only=true"):
        GAttStage().check(c)
    assert not os.path.exists(tmp_path / "gatt" / "data")
    # the plain anchors are training answers: only those that ended (rlhf.require_eos) are kept; here every
    # answer asked with no instruction is cut at eval_max_new_tokens (None when finished_only), the others end
    from llama_jax import stages

    def answers(cfg, params, tok, dialogs, max_new, mesh=None, finished_only=False, **k):
        return [None if finished_only and d[0]["role"] != "system" else "WORDS" for d in dialogs]

    monkeypatch.setattr(stages, "_greedy_answers", answers)
    loaded = []  # the stage itself goes to sampling_model: init_from at the run's step and context
    monkeypatch.setattr(stages, "sampling_model", lambda config, path, stage=None: loaded.append(stage) or (None,) * 5)
    c.rlhf.prompts, c.gatt.num_dialogs, c.gatt.plain_anchors, c.gatt.keep_only_adherent = "synthetic", 4, 3, False
    c.gatt.num_eval_dialogs = c.gatt.num_plain_eval = 2
    for require_eos, rows in ((True, 4), (False, 7)):
        c.rlhf.require_eos = require_eos
        stage = GAttStage()
        stage.train_path = str(tmp_path / f"gatt_{require_eos}.jsonl")
        stage._build(c, str(tmp_path))
        assert len(open(stage.train_path).readlines()) == rows and loaded[-1] is stage


def test_the_sample_after_pretraining_fits_the_context(tokenizer_path):
    """The sample printed after pretraining gets the room the context leaves; a prompt
    with none left is one line, not an error after the run is done."""
    from helpers import random_params

    from llama_jax.model import Llama, LlamaConfig
    from llama_jax.stages import PretrainStage
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    cfg = LlamaConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=24)
    model, said = Llama(cfg), []
    progress = type("P", (), {"message": lambda self, m: said.append(m)})()
    c = load_experiment("pretrain").get_config("tiny")
    c.data.eval_source, c.sample.max_new_tokens, c.sample.temperature = "", 1000, 0.0
    c.sample.prompt = "def f"
    PretrainStage().after_training(c, "", model, random_params(cfg), tok, progress)
    assert said[-1].startswith("sample:\ndef f")  # 1000 new tokens asked, the context's room given
    c.sample.prompt = "word " * 40
    PretrainStage().after_training(c, "", model, random_params(cfg), tok, progress)
    assert said[-1] == f"no sample: config.sample.prompt has {len(tok.encode(c.sample.prompt, bos=True))} tokens " \
                       "and the context is 24"


def test_ppo_scores_rollouts_a_micro_batch_at_a_time_and_cuts_at_chat_tags(tokenizer_path):
    """PPO's rollout forward runs batch_size / grad_accum_steps rows at a time (the last
    chunk padded, its padding dropped), in order; an answer that writes a chat tag ends
    before it, its tokens and the text the reward models see alike."""
    import types

    import jax
    import numpy as np

    from llama_jax import sharding
    from llama_jax.stages import PPOStage
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    c = load("ppo").get_config("tiny")
    c.batch_size, c.grad_accum_steps, c.seq_len = 4, 2, 32  # chunks of 2 rows
    shapes, seen = [], {}

    def forward(params, ref, tokens, positions, segment_ids, targets):
        shapes.append(tokens.shape)
        mark = jax.numpy.asarray(tokens, jax.numpy.float32) + 1000.0 * segment_ids.sum(axis=1, keepdims=True)
        return mark, -mark, mark[:, :1]

    def rms(dialogs, is_safety):
        seen["answers"] = [d[-1]["content"] for d in dialogs]
        return {"gated": np.zeros(len(dialogs))}

    stage = PPOStage()
    stage.config, stage.ready, stage.forward, stage.ref_params, stage.rms = c, True, forward, None, rms
    stage.runtime = types.SimpleNamespace(tokenizer=tok, mesh=sharding.make_mesh(1, -1, 1),
                                          rules=sharding.DEFAULT_RULES)
    texts = ["the cat sat", "on the mat [INST] and more", "42", "the 日本 mat", "1999 cat"]
    prompts = [types.SimpleNamespace(tokens=[tok.bos_id] + tok.encode(f"q{i}"), messages=[
        {"role": "user", "content": f"q{i}"}], is_safety=False) for i in range(5)]
    answers = [tok.encode(t) + [tok.eos_id] for t in texts]
    rows, scored, logp, ref_logp, values = stage._evaluate_answers(None, prompts, answers)
    assert set(shapes) == {(2, 32)} and len(shapes) == 3  # 5 rows: 2 + 2 + 1 padded
    assert logp.shape == (5, 32) and values.shape == (5, 1)
    np.testing.assert_array_equal(logp, rows["tokens"] + 1000.0 * rows["segment_ids"].sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(ref_logp, -logp)
    assert seen["answers"] == scored["texts"] == ["the cat sat", "on the mat", "42", "the 日本 mat", "1999 cat"]
    cut = rows["tokens"][1][rows["segment_ids"][1] > 0][len(prompts[1].tokens):]
    assert tok.decode(cut).strip() == "on the mat" and tok.eos_id not in cut
    assert rows["loss_mask"][1].sum() == len(cut)  # the tag and what follows are not trained on


def test_exact_match_leaves_out_dialogs_the_context_cannot_answer(tmp_path, tokenizer_path, monkeypatch, capsys):
    """A held-out dialog whose prompt leaves fewer than eval_max_new_tokens of the context
    cannot be answered: it is left out of the fraction (and counted in a note), not
    counted wrong (a 128-token import's SFT capped at 76.5% without a word)."""
    import json

    from llama_jax import stages
    from llama_jax.model import LlamaConfig
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    dialogs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
               [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "no"}]]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    cfg = LlamaConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=48)

    def answers(cfg, params, tokenizer, prompts, max_new_tokens, *a, **k):  # right wherever it can answer
        return [d[-1]["content"] if stages.generate_fits(cfg, len(tokenizer.encode_dialog(p)), max_new_tokens)
                else None for p, d in zip(prompts, dialogs)]

    monkeypatch.setattr(stages, "_greedy_answers", answers)
    assert stages.exact_match(cfg, None, tok, str(path), 10, 8) == 1.0
    assert "exact match leaves out 1 of 2 held-out dialogs" in capsys.readouterr().out
    assert stages.exact_match(cfg, None, tok, str(path), 10, 8) == 1.0
    assert capsys.readouterr().out == ""  # said once
    # an answer longer than eval_max_new_tokens cannot be given: counted wrong, and said
    dialogs[0][-1]["content"] = " ".join(["yes"] * 12)
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    assert stages.exact_match(cfg, None, tok, str(path), 10, 8) == 1.0  # the stub answers it: the note is the point
    assert "exact match counts 1 of the 1 scored held-out answers wrong whatever the model says: they are " \
        "longer than eval_max_new_tokens 8 tokens" in capsys.readouterr().out
    # no dialog leaves room for an answer: no score (it was 0.0), and the long answer of a dialog left out is not
    # counted in the note as well
    small = LlamaConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=12)
    dialogs[1][-1]["content"] = " ".join(["no"] * 12)
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    assert stages.exact_match(small, None, tok, str(path), 10, 7) is None
    assert "counts" not in capsys.readouterr().out


def test_the_reward_models_policy_pair_settings_are_checked_before_sampling(tmp_path, monkeypatch):
    """reward.policy_* (the RM's pairs of the policy's own answers) are checked when the
    stage starts: one answer per prompt makes no pair, temperature 0 makes every answer
    one, and an answer budget as long as seq_len leaves no prompt (they failed inside
    generate, or gave an empty pair file, after the model was loaded)."""
    from llama_jax import stages
    from llama_jax.train import RunError

    monkeypatch.setattr(stages, "sampling_model", lambda *a, **k: pytest.fail("sampled before its settings"))
    c = load("reward_model").get_config("tiny")
    c.init_from, c.reward.policy_prompts, c.data.synthetic_train, c.data.synthetic_eval = str(tmp_path), 8, 8, 8
    for field, value, words in (("policy_samples", 1, "a whole number >= 2"),
                                ("policy_pairs_per_prompt", 0, "a whole number >= 1"),
                                ("policy_max_new_tokens", 0, "a whole number >= 1"),
                                ("policy_temperature", 0.0, "a finite number > 0"),
                                ("policy_fraction", float("nan"), "a finite number > 0"),
                                ("policy_max_new_tokens", c.seq_len, "leaves no room for a prompt")):
        before, c.reward[field] = c.reward[field], value
        with pytest.raises(RunError, match=rf"config.reward.{field} .*{words}"):
            stages.RewardModelStage().prepare(c, str(tmp_path / "rm"))
        c.reward[field] = before
