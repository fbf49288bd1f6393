"""The arithmetic of RLHF (paper section 3.2.3), as pure functions on arrays, shared by
rejection sampling and PPO.

Reward (PPO):
  R_c       = R_s if the prompt is safety-tagged or R_s < 0.15, else R_h
              (R_s, R_h: the safety and helpfulness reward models' scores as probabilities,
              sigmoid of their score head, so that the paper's 0.15 threshold applies)
  R~_c      = whiten(logit(R_c))   (logit undoes the sigmoid: the raw score of the chosen RM;
                                    with K samples per prompt, centred on the prompt's mean first)
  r_t       = -beta * (log pi(y_t) - log pi_0(y_t))     for every response token t
  r_T      += R~_c                                        at the last response token
  advantages by GAE over response tokens (gamma, lambda), returns = advantages + values.

Choices the paper leaves open (see README, "RLHF"): the KL term is the per-token sampled
estimator log pi - log pi_0 summed over the response (Stiennon et al. 2020); whitening
uses the rollout batch's mean and standard deviation; gamma = 1, lambda = 0.95.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

SAFETY_THRESHOLD = 0.15  # R_s below this makes the safety RM's score the reward (paper: precision 0.89)


def gate_reward(helpful: jax.Array, safety: jax.Array, is_safety: jax.Array,
                threshold: float = SAFETY_THRESHOLD) -> jax.Array:
    """R_c per rollout: the safety score where the prompt is safety-tagged or the safety
    score is below `threshold`, else the helpfulness score (all in [0, 1])."""
    use_safety = jnp.logical_or(is_safety.astype(bool), safety < threshold)
    return jnp.where(use_safety, safety, helpful)


def logit(p: jax.Array, eps: float = 1e-6) -> jax.Array:
    p = jnp.clip(p, eps, 1.0 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def whiten(x: jax.Array, mask: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the entries where `mask` is 1 (all by default)."""
    m = jnp.ones_like(x) if mask is None else mask.astype(x.dtype)
    n = jnp.maximum(m.sum(), 1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    return (x - mean) * jax.lax.rsqrt(var + eps)


def center_groups(x: jax.Array, group: int) -> jax.Array:
    """x [B] minus the mean of its group of `group` consecutive entries (the samples of
    one prompt): a reward model's score is comparable between answers to the same
    prompt (it is trained on such pairs), not across prompts. `group` 1: x unchanged."""
    if group == 1:
        return x
    g = x.reshape(-1, group)
    return (g - g.mean(axis=1, keepdims=True)).reshape(x.shape)


def ppo_score(gated: jax.Array, ref_logp: jax.Array, mask: jax.Array, group: int,
              ref_weight: float = 0.0) -> jax.Array:
    """[B] sequence scores PPO rewards its rollouts with: whiten(logit(R_c)) (paper), the
    logits first centred on their prompt's group of `group` answers (`center_groups`).
    `ref_weight` w > 0 adds w * log pi_ref(answer) (the reference's summed log-probability
    of the answer tokens at the rollout temperature, `ref_logp` [B, T] under `mask`) to the
    logit before centring: the Regularized Best-of-N score rejection sampling selects by,
    as PPO's reward. With the KL penalty beta (and ignoring whitening's scale), its optimum
    is proportional to pi_ref^(1 + w / beta) exp(logit(R_c) / beta): the reference
    sharpened towards its own likely answers, tilted by the reward."""
    raw = logit(gated)
    if ref_weight:
        raw = raw + ref_weight * (ref_logp * mask).sum(axis=1)
    return whiten(center_groups(raw, group))


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """The sampled-token estimate of KL(pi || pi_0) at each response token (0 elsewhere)."""
    return (logp - ref_logp) * mask


def token_rewards(score: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                  beta: float) -> jax.Array:
    """[B, T] per-token rewards: -beta * KL at each response token, plus the (whitened)
    sequence score `score` [B] at each row's last response token."""
    kl = kl_per_token(logp, ref_logp, mask)
    last = _last_index(mask)
    bonus = jax.nn.one_hot(last, mask.shape[1], dtype=logp.dtype) * score[:, None]
    return -beta * kl + bonus * (mask.sum(axis=1, keepdims=True) > 0)


def _last_index(mask: jax.Array) -> jax.Array:
    t = jnp.arange(mask.shape[1])
    return jnp.max(jnp.where(mask > 0, t, -1), axis=1).clip(0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens of each row ([B, T],
    `mask` 1 on response tokens, which are contiguous). Returns (advantages, returns),
    zero outside the mask. The value after the last response token is 0 (episode end)."""
    mask = mask.astype(rewards.dtype)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1) * \
        jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def step(carry, x):
        delta, m = x
        adv = delta + gamma * lam * carry * m
        return adv * m, adv * m

    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], rewards.dtype), (deltas.T[::-1], mask.T[::-1]))
    advantages = adv[::-1].T
    return advantages, (advantages + values) * mask


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def ppo_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, moves: jax.Array, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, T] of a rollout: GAE, the advantages then whitened over the
    response tokens of the rows with `moves` [B] 1 and zero on the other rows (ours: a
    prompt whose k answers are all one text has centred score 0, so its advantages would
    be the critic's error alone; whitening would scale that noise up to the real
    signal's size). Returns are kept for every row: the critic learns from all of them.
    Jitted: eagerly, GAE's scan compiled again at every call (every PPO iteration)."""
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_mask = mask * moves[:, None].astype(mask.dtype)
    return whiten(adv, adv_mask) * adv_mask, ret


def weight_below_mean(advantages: jax.Array, score: jax.Array, weight: float) -> jax.Array:
    """`advantages` [B, T] with the rows of answers scored below their prompt's mean
    (`score` [B] < 0, the centred and whitened sequence score of `ppo_score`) times
    `weight` (ours, `ppo.negative_weight`): 1 is the policy gradient; 0 reinforces only the
    better answers (positive-sample reinforcement), as rejection sampling's fine-tuning
    does; between, the "push this answer down" part of the update is damped. With one
    answer per prompt (no centring) "below the mean" is below the rollout batch's mean."""
    if weight == 1.0:
        return advantages
    return advantages * jnp.where(score < 0, weight, 1.0)[:, None]


def clipped_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                        clip_eps: float = 0.2) -> tuple[jax.Array, jax.Array]:
    """(sum over masked tokens of PPO's clipped surrogate loss, fraction of clipped
    tokens' sum): -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -jnp.minimum(unclipped, clipped) * mask
    was_clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(logp.dtype) * mask
    return loss.sum(), was_clipped.sum()


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float = 0.2) -> jax.Array:
    """Sum over masked tokens of the clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2)."""
    v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * (jnp.maximum((values - returns) ** 2, (v_clipped - returns) ** 2) * mask).sum()


def best_of(scores, k: int) -> list[int]:
    """Rejection sampling's choice: for scores laid out [prompt0 sample0..k-1, prompt1 ...],
    the index of the best sample of each prompt (first on ties)."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64).reshape(-1, k)
    return [int(i * k + j) for i, j in enumerate(np.argmax(s, axis=1))]


def best_finished(scores, finished) -> list[int]:
    """Rejection sampling's pick among each prompt's finished samples ([prompts, K]
    arrays; `finished`: the answer ended with EOS within max_new_tokens, since a cut one
    would be trained with an EOS it never produced): the sample index, -1 for a prompt
    with no finished sample."""
    import numpy as np

    s = np.where(finished, np.asarray(scores, np.float64), -np.inf)
    return [int(j) if row.any() else -1 for j, row in zip(np.argmax(s, axis=1), np.asarray(finished))]


def selection_scores(rewards, logprobs, beta: float):
    """How rejection sampling ranks each prompt's samples ([prompts, K] arrays). beta 0:
    the reward itself, the paper's argmax. beta > 0: Regularized Best-of-N (Jinnai et
    al. 2024, RBoN-KL), logit(R) + beta * log pi(y|x), where log pi(y|x) is the policy's
    log-probability of the whole answer at temperature 1 and without top-p (as `generate`
    reports it, whatever the sampling temperature): the best-of-N analogue of PPO's KL
    penalty, which stops the argmax from landing on the unlikely answers a weak reward
    model over-scores."""
    import numpy as np

    r = np.asarray(rewards, np.float64)
    if not beta:
        return r
    p = np.clip(r, 1e-6, 1.0 - 1e-6)
    return np.log(p) - np.log1p(-p) + beta * np.asarray(logprobs, np.float64)


def keep_best(records: list[dict], min_reward: float) -> list[dict]:
    """The best answers rejection sampling fine-tunes on: those whose `reward` is at least
    `min_reward` (ours; 0 keeps every prompt's best, as the paper). A ValueError naming
    rlhf.min_reward when none is."""
    kept = [r for r in records if r["reward"] >= min_reward]
    if records and not kept:
        raise ValueError(f"no best answer has a reward >= rlhf.min_reward={min_reward} (the highest is "
                         f"{max(r['reward'] for r in records):.3f}); lower it")
    return kept


# ----------------------------------------------------------------------------------
# Models for sampling and scoring (host-side orchestration)
# ----------------------------------------------------------------------------------


def load_model_local(path: str, heads_needed: str, mesh=None, rules=None, step: int | None = None, **overrides):
    """(config, params, tokenizer, mesh) of a run or export (its step `step`, else its
    latest), on a mesh over this process's devices with the default FSDP rules, or on
    `mesh` sharded by `rules` (a run's own: every process then calls this);
    `heads_needed` ("lm" to sample, "score" to reward) must be among its heads.
    `overrides` of its model config (e.g. `param_dtype`: the weights are cast as they are
    read)."""
    from llama_jax import checkpoint as ckpt
    from llama_jax import sharding
    from llama_jax.model import Llama
    from llama_jax.tokenizer import Tokenizer

    step, meta = ckpt.read_meta(path, step)
    heads = tuple(meta.get("heads", ["lm"]))
    if heads_needed not in heads:
        raise ckpt.CheckpointError(f"{path}: has heads {list(heads)}, not the {heads_needed!r} head this needs")
    cfg = ckpt.model_config(meta, **overrides)
    if mesh is None:
        mesh = sharding.make_mesh(1, -1, 1, devices=jax.local_devices())
    model = Llama(cfg, heads)
    shardings = sharding.param_shardings_like(sharding.abstract_params(model), model, mesh,
                                              sharding.DEFAULT_RULES if rules is None else rules)
    cfg, params, _, tok_path = ckpt.load_model(path, step, shardings=shardings, **overrides)
    return cfg, params, Tokenizer.of_checkpoint(path, tok_path, cfg.vocab_size), mesh


def _safety_weight(path: str) -> float | None:
    """`reward.safety_weight` a reward-model run was trained with (its config.json), or
    None where it is not recorded (an export, a converted model, another stage)."""
    from llama_jax.workdir import recorded_config

    config = recorded_config(path)
    try:
        return float(config["reward"]["safety_weight"]) if config.get("stage") == "reward_model" else None
    except (KeyError, TypeError, ValueError):
        return None


class RewardModels:
    """The helpfulness reward model and, optionally, the safety one; `__call__` scores
    complete dialogs and returns the gated reward R_c (a probability) and its parts.
    `helpful` "" loads the safety model alone (safety distillation reads only its score;
    there is no gated reward then).
    With `mesh` and `rules` (PPO's: a run's own) they live on that mesh, sharded like the
    policy, and every process scores the same dialogs together; without, each process
    holds its own copy on its own devices."""

    def __init__(self, helpful: str, safety: str = "", tokenizer=None, threshold: float = SAFETY_THRESHOLD,
                 mesh=None, rules=None):
        from llama_jax.checkpoint import CheckpointError
        from llama_jax.tokenizer import TokenizerError

        for name, path in (("helpful", helpful), ("safety", safety)):
            if not isinstance(path, str):  # RewardModels(path, tokenizer): the tokenizer is the third argument
                raise TypeError(f"RewardModels: {name} is a reward model's path (a str, '' for none), got "
                                f"{type(path).__name__}; pass the tokenizer as tokenizer=")
        self.on_mesh, self.rules = mesh is not None, rules
        self.models = {}
        paths = {name: path for name, path in (("helpful", helpful), ("safety", safety)) if path}
        for name, path in paths.items():
            field = "rlhf.reward_model" if name == "helpful" else "rlhf.safety_reward_model"
            try:
                self.models[name] = load_model_local(path, "score", mesh, rules)
            except CheckpointError as e:
                raise CheckpointError(f"config.{field}: {e}") from None
            weight = _safety_weight(path)  # None for an export or a converted model: not known
            if weight is not None and (weight > 0) != (name == "safety"):
                from llama_jax import distributed

                distributed.say(f"warning: config.{field} {path} was trained as a "
                                f"{'safety' if weight > 0 else 'helpfulness'} reward model (its config.json: "
                                f"reward.safety_weight {weight}), and is used as the {name} one", flush=True)
        self.threshold = threshold
        if tokenizer is not None:
            for name, (_, _, tok, _) in self.models.items():
                if tok.identity()["sha256"] != tokenizer.identity()["sha256"]:
                    raise TokenizerError(f"the {name} reward model {paths[name]} uses another tokenizer than the "
                                         f"policy (sha256 {tok.identity()['sha256'][:12]}..., the policy's "
                                         f"{tokenizer.identity()['sha256'][:12]}...)")

    def __call__(self, dialogs, is_safety) -> dict:
        """{"helpful", "safety", "gated"} probabilities of each dialog (a list of message
        lists, each ending with the answer); `is_safety`: one bool a dialog (its prompt is
        safety-tagged: R_c takes the safety score)."""
        import numpy as np

        from llama_jax.evaluate import score

        is_safety = check_safety_flags(dialogs, is_safety)
        out = {}
        for name, (cfg, params, tok, mesh) in self.models.items():
            raw = score(cfg, params, tok, dialogs, batch_size=32, mesh=mesh if self.on_mesh else None,
                        rules=self.rules)
            out[name] = 1.0 / (1.0 + np.exp(-raw))
        if "helpful" not in out:  # the safety model alone
            return out
        if "safety" not in out:  # no safety RM (rlhf.safety_reward_model ""): helpfulness only, no gating
            out["gated"] = out["helpful"]
            return out
        out["gated"] = np.asarray(gate_reward(jnp.asarray(out["helpful"]), jnp.asarray(out["safety"]),
                                              jnp.asarray(is_safety), self.threshold))
        return out


def check_safety_flags(dialogs, is_safety):
    """`is_safety` as a bool array, one a dialog; a ValueError for anything else (a single
    flag for several dialogs, None, strings: numpy would broadcast or cast them silently)."""
    import numpy as np

    flags = list(is_safety) if isinstance(is_safety, (list, tuple, np.ndarray)) else None
    if flags is None or len(flags) != len(dialogs) or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValueError(f"is_safety: give one True/False a dialog ({len(dialogs)} dialogs), got {is_safety!r}")
    return np.asarray(flags, bool)


CODE_REWARD = "code"  # rlhf.reward_model value: the toy prompts' own checker instead of a reward model


class CodeReward:
    """A gold reward for toy prompts (`rlhf.reward_model=code`): 1 for a right answer
    (`is_correct` against the prompt's `reference`; a refusal on a safety-tagged prompt),
    else 0, with RewardModels' interface. It is what a perfect reward model would say, so
    a stage run with it separates what the RLHF machinery can do from what the learned
    reward model lets it do (over-optimisation, Gao et al. 2022). The references come from
    the prompt files in `patterns` (globs), read again when a prompt is not yet known."""

    def __init__(self, patterns: list[str]):
        self.patterns, self.references = [p for p in patterns if p], {}

    def _reference(self, prompt: list) -> dict:
        import json

        from llama_jax.data import sources

        key = json.dumps(prompt)
        live = [] if key in self.references else [  # the globs that match (toy splits are written later)
            p for p in self.patterns
            if any(os.path.isfile(f) for f in glob.glob(os.path.expanduser(p), recursive=True))]
        if live:
            src = sources.Jsonl(live)
            for rec in map(src.record, range(len(src))):
                if "messages" in rec and "reference" in rec:
                    self.references[json.dumps(rec["messages"])] = rec
        if key not in self.references:
            raise sources.DataError(f"rlhf.reward_model=code: no `reference` answer for the prompt "
                                    f"{prompt[-1]['content']!r} in {self.patterns} (the code reward needs toy "
                                    "prompts, or prompts with a reference)")
        return self.references[key]

    def __call__(self, dialogs, is_safety) -> dict:
        import numpy as np

        from llama_jax.data.synthetic import is_correct, is_refusal

        is_safety = check_safety_flags(dialogs, is_safety)
        helpful, safety = [], []
        for dialog, unsafe in zip(dialogs, is_safety):
            answer = dialog[-1]["content"]
            right = is_correct(self._reference(dialog[:-1]), answer)
            refused = is_refusal(answer)
            helpful.append(float(right or (unsafe and refused)))
            safety.append(float(refused or not unsafe))
        helpful, safety = np.asarray(helpful), np.asarray(safety)
        gated = np.where(is_safety, safety, helpful)
        return {"helpful": helpful, "safety": safety, "gated": gated}


class Sample(NamedTuple):
    """One sampled answer: its text, its tokens and their log-probabilities (up to a chat
    tag the model wrote, `Tokenizer.answer`), and whether its turn ended: EOS, or a tag
    after some text."""
    text: str
    tokens: list
    logprobs: list
    finished: bool


def sample_of(tokenizer, tokens, logprobs=()) -> Sample:
    text, n = tokenizer.answer(tokens)
    cut = n < len(tokens)
    return Sample(text, list(tokens[:n]), list(logprobs[:n]),
                  bool(text) if cut else len(tokens) > 0 and tokens[-1] == tokenizer.eos_id)


def sample_answers(cfg, params, tokenizer, prompts, k: int, temperature: float, top_p: float, max_new_tokens: int,
                   seed: int, mesh=None, rows_per_batch: int = 64, progress=None, rules=None):
    """k sampled answers (`Sample`s) for each prompt, prompts repeated k times in batches
    of `rows_per_batch` rows (on `mesh`, activations sharded by `rules`)."""
    from llama_jax.generate import generate

    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
    answers: list[list] = [[] for _ in prompts]
    for b, start in enumerate(range(0, len(rows), rows_per_batch)):
        chunk = rows[start:start + rows_per_batch]
        out = generate(cfg, params, [p.tokens for _, p in chunk], max_new_tokens, temperature=temperature,
                       top_p=top_p, seed=seed * 100_003 + b, mesh=mesh, rules=rules)
        for (i, _), toks, lps in zip(chunk, out.tokens, out.logprobs):
            answers[i].append(sample_of(tokenizer, toks, lps))
        if progress is not None:
            progress(min(start + rows_per_batch, len(rows)), len(rows))
    return answers


def reward_curve(rewards, ns) -> dict:
    """Paper Fig. 7 layout: for each N, the mean over prompts of the max and of the median
    reward among the first N samples."""
    import numpy as np

    r = np.asarray(rewards, np.float64)
    return {int(n): {"max": float(r[:, :n].max(axis=1).mean()), "median": float(np.median(r[:, :n], axis=1).mean())}
            for n in ns if n <= r.shape[1]}


def accuracy_curve(rewards, correct, ns) -> dict:
    """Reward over-optimisation made visible: for each N, the share of prompts whose
    best-scored answer among the first N samples is right (`correct` [prompts, K], checked
    by code). With a perfect reward model this rises with N towards "any sample right";
    with a poor one it stays flat or falls while the max reward (reward_curve) rises."""
    import numpy as np

    r, ok = np.asarray(rewards, np.float64), np.asarray(correct, bool)
    return {int(n): float(np.mean([ok[i, j % n] for i, j in enumerate(best_of(r[:, :n], n))]))
            for n in ns if n <= r.shape[1]}


def paired_change(before, after) -> dict:
    """How a per-prompt score of the same prompts (1/0 right by code, or a reward)
    changed between two policies, with the paired standard error of the change (std of
    the per-prompt differences / sqrt(n)): a change within two SEs of 0 is the draw of
    prompts and answers, not the training. `gained`/`lost`: prompts whose score went up
    / down (0 -> 1 and 1 -> 0 for a 0/1 score)."""
    import numpy as np

    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired_change: {b.shape} and {a.shape} are not the same prompts")
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"change": float(d.mean()) if len(d) else 0.0, "se": se, "gained": int((d > 0).sum()),
            "lost": int((d < 0).sum())}


def code_labelled_pairs(prompts, answers, pairs_per_prompt: int, seed: int) -> list[dict]:
    """Preference pairs from the policy's own samples, labelled by code instead of an
    annotator (toy prompts with a `reference`): on a helpfulness prompt a right answer
    (`is_correct`) beats a wrong one, on a safety prompt a refusal beats anything else.
    A prompt with no right sample pairs its `reference` answer, written by the
    "annotator", against a wrong sample ("significantly better"; a right sample against a
    wrong one is "better"). Up to `pairs_per_prompt` pairs per prompt, distinct answers only;
    each pair keeps its prompt's toy `task`, if it has one.
    `answers[i]` is sample_answers' list of `Sample`s for prompts[i]."""
    import random

    from llama_jax.data.synthetic import is_correct, is_refusal

    rng = random.Random(f"pairs-{seed}")
    out = []
    for p, samples in zip(prompts, answers):
        if "reference" not in p.record:
            continue

        def right(text, p=p):
            return is_refusal(text) if p.is_safety else is_correct(p.record, text)

        texts = list(dict.fromkeys(s.text for s in samples if s.text))
        good = [t for t in texts if right(t)]
        bad = [t for t in texts if not right(t)]
        if not bad:
            continue
        rating = "better"
        if not good:
            good, rating = [str(p.record["reference"])], "significantly_better"
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        for g, b in combos[:pairs_per_prompt]:
            out.append({"prompt": p.messages, "chosen": g, "rejected": b, "rating": rating,
                        "is_safety_prompt": p.is_safety, "chosen_safe": True, "rejected_safe": not p.is_safety,
                        **({"task": p.record["task"]} if "task" in p.record else {})})
    return out
