"""PPO (paper 3.2.3, RLHF V5): the policy maximises the gated reward-model score minus
beta * KL to the initial policy, with clipped PPO updates on its own rollouts.

  tiny  python -m llama_jax.main --config=experiments/ppo.py:tiny --workdir=runs/ppo \\
            --config.init_from=runs/rs1 --config.rlhf.reward_model=runs/rm \\
            --config.rlhf.safety_reward_model=runs/rm_safety
        Any CPU, ~10-15 min (2 cores, estimated). Up to 200 iterations of 64 rollouts (up to 24
        tokens): 4 answers to each of 16 toy prompts, their scores centred on the
        prompt's mean (ppo.samples_per_prompt; the paper: one answer to each of 512
        prompts), 4 mini-batches of 16 each (one step per mini-batch); the first 2
        iterations train only the value head, which learns at 1e-3 against the policy's
        1e-5 and reads the trunk through stop_gradient (ppo.detach_value), so its loss
        never moves the policy. Every 50 iterations the ~2,000 validation prompts are answered (val_*:
        greedily and twice sampled), and early stopping keeps the best validation reward
        of the sampled answers (the expectation PPO maximises), stopping after 2
        evaluations without a better one or as soon as the validation true accuracy
        (greedy or sampled) falls more than 1 point below where it started; the ~2,000
        held-out prompts (eval_*) are answered before and by the kept weights only.
        Expected: the value loss falls (~1.1 -> ~0.4), the sampled held-out reward rises
        by a little under a point (+0.6 to +0.8 +- 0.2 in session 23's runs from the
        recipe's rejection-sampled policy), the greedy one within its noise, true
        accuracy within its noise, KL ~0.1-0.2 nats/answer (ppo.json, README): PPO
        sharpens the policy towards the RM's choice among answers it already gives.
        In session 24's from-scratch recipe runs (a stronger SFT policy, 97.6% right, judged
        by an RM right on 80% of its pairs) the guard stopped PPO at its first evaluation:
        accuracy fell without a reward gain, and the initial weights were kept. Session 25:
        the fall is on sums, which the RM ranks barely above chance; with the toy check as
        the reward (rlhf.reward_model=code) PPO neither gains nor loses in 100 iterations.
        Session 26: at LR 1e-4 even the perfect reward breaks the policy (82.5% greedy at
        iteration 50: Adam moves every weight by about the LR on a sparse gradient), and
        no variant tried at 1e-5 or 3e-5 (no critic, ppo.critic=none; only the better
        answers reinforced, ppo.negative_weight=0; w 4 or 8; 256 rollouts a step) raised
        the held-out sampled reward or accuracy.
        Session 27: from the SFT policy (the recipe's PPO start since then) PPO meets its row.
        With --config.ppo.ref_logprob_weight=4 and the RM: held-out sampled reward +1.0 +- 0.2
        points, sampled true accuracy +0.9 +- 0.4, greedy level, KL 0.03-0.05 nats, 10 min on
        a 2-core Intel Xeon. With the RM alone it hacks sums (97.5 -> 89.0% greedy, stopped).
        With the perfect reward: +0.7 +- 0.3 / +1.0 +- 0.4 points greedy / sampled.
        Session 28: the recipe runs this stage for 100 iterations on rows of 64 tokens
        (--config.total_steps=400 --config.seq_len=64), for time; the held-out and
        validation passes, not the updates, are most of its minutes (session 29's profile:
        mostly their sampling; the toy model's log-probabilities take little).
  7b | 13b | 34b | 70b
        the paper's settings: beta 0.01 (7B/13B) or 0.005 (34B/70B), clip 0.2, AdamW
        (0.9, 0.95, 1e-5), weight decay 0.1, grad clip 1.0, constant LR 1e-6, 512 rollouts
        per iteration in mini-batches of 64, up to 400 iterations early-stopped on the
        validation prompts' reward (rlhf.val_prompts; patience 3 evaluations of 10
        iterations), ending on the best weights.
        The critic is ours (the paper leaves it open): the value head at LR 1e-4 after 2
        value-only iterations (untested at scale). Rollouts sample from a copy of the
        policy all-gathered over fsdp (mesh.gather_for_generation), as the paper did.
"""

import ml_collections

from llama_jax.configs import paper_scale, rlhf_config

PAPER_BETA = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}


def get_config(arg: str = "tiny"):
    c = rlhf_config()
    c.stage = "ppo"
    c.eval_exact_match = 0
    c.ppo = ml_collections.ConfigDict()
    c.ppo.beta = 0.01  # KL penalty (paper: 0.01 for 7B/13B, 0.005 for 34B/70B)
    c.ppo.clip_eps = 0.2  # PPO ratio clip (paper)
    # ours (the paper leaves the critic open): "value_head", a value head on the policy's trunk with GAE; or
    # "none", no critic: each token's advantage is its answer's return-to-go (the score centred on its
    # prompt's answers, minus the KL penalty to come), the group mean as the baseline (RLOO / GRPO's choice;
    # needs samples_per_prompt > 1)
    c.ppo.critic = "value_head"
    c.ppo.value_clip = 0.2  # value-function clip (ours; the paper leaves the critic unspecified)
    c.ppo.vf_coef = 0.1  # weight of the value loss on the shared trunk (ours)
    # ours: the value head reads the trunk through stop_gradient, so the critic's loss trains the head alone
    # (tiny: on; the paper-scale presets keep the shared trunk, untested there)
    c.ppo.detach_value = False
    c.ppo.value_learning_rate = 0.0  # the value head's own constant LR (ours; 0 = optimizer.learning_rate)
    c.ppo.value_warmup_iterations = 0  # first iterations train only the value head (ours)
    c.ppo.gamma = 1.0  # GAE discount (ours: episodic, no discount)
    c.ppo.lam = 0.95  # GAE lambda (ours)
    c.ppo.rollout_batch = 512  # prompts per PPO iteration (paper); batch_size is the mini-batch
    c.ppo.epochs = 1  # passes over each iteration's rollouts, one step per mini-batch each (paper: 1)
    c.ppo.samples_per_prompt = 1  # answers per prompt in a rollout, scores centred per prompt (paper: 1)
    # ours, an ablation (off): with samples_per_prompt > 1, a prompt whose answers are all one text gets no
    # policy update (its centred score is 0, so its advantages are the critic's error alone); the critic
    # still learns from it. Session 25: no measurable effect on the toy recipe's PPO (README)
    c.ppo.skip_uniform_groups = False
    # ours: the advantages of answers scored below their prompt's mean are multiplied by this (1 = the policy
    # gradient; 0 = only the better answers are reinforced, as rejection sampling's fine-tuning does)
    c.ppo.negative_weight = 1.0
    c.ppo.ref_logprob_weight = 0.0  # ours: reward logit(R_c) + w * log pi_ref(answer), RBoN's score (paper: 0)
    c.optimizer.schedule = "constant"
    c.optimizer.learning_rate = 1e-6  # paper
    c.optimizer.warmup_steps = 0
    c.rlhf.temperature = 1.0
    if arg == "tiny":
        c.init_from = "runs/rs1"
        c.rlhf.reward_model = "runs/rm"
        c.rlhf.safety_reward_model = "runs/rm_safety"
        c.rlhf.num_prompts = 4096  # 200 iterations x 16 prompts: no training prompt is seen twice
        # ~2,000 after dropping training prompts: a paired change to +-0.2 points (~500 gave +-0.4)
        c.rlhf.num_eval_prompts = 2048
        c.rlhf.eval_samples = 2  # and 2 answers per held-out prompt sampled at T=1.0 (the rollouts' own)
        c.rlhf.max_new_tokens = 24
        c.ppo.rollout_batch = 64
        # 4 answers to each of 16 prompts (ours): the RM ranks answers to one prompt (its training pairs),
        # its scores are not comparable across prompts (sums score low whatever the answer)
        c.ppo.samples_per_prompt = 4
        c.batch_size = 16
        c.seq_len = 96
        c.total_steps = 800  # up to 200 iterations x 4 mini-batches (paper: 200-400 iterations)
        c.log_every_steps = 4
        c.eval_every_steps = 200  # every 50 iterations: the validation prompts, for early stopping
        c.checkpoint_every_steps = 200
        c.rlhf.num_val_prompts = 2048  # another toy draw (~2,000 after dropping training and held-out prompts)
        # The paper: early-stopped on held-out prompts' reward. Ours: the sampled answers' reward,
        # the expectation PPO maximises; the greedy answer's reward moves within its noise.
        c.early_stopping.metric = "val_sampled_reward"
        c.early_stopping.patience = 2
        # ours, the toy's code check: reward hacking that costs a point of accuracy stops the run
        c.early_stopping.guard = "val_true_accuracy,val_sampled_true_accuracy"
        c.early_stopping.guard_tolerance = 0.01
        c.optimizer.learning_rate = 1e-5
        c.ppo.value_learning_rate = 1e-3  # a fresh head at the policy's 1e-5 does not learn in 40 iterations
        c.ppo.value_warmup_iterations = 2  # 8 value-only steps before the policy moves
        # the critic's loss off the policy's trunk: with it on the trunk, PPO with a perfect reward lost a
        # point of accuracy in 16 iterations; detached it lost none (session 25)
        c.ppo.detach_value = True
        return c
    if arg not in PAPER_BETA:
        raise ValueError(f"experiments/ppo.py: unknown arg {arg!r}; use tiny, 7b, 13b, 34b or 70b")
    paper_scale(c, arg, batch_size=64)
    c.ppo.beta = PAPER_BETA[arg]
    c.ppo.value_learning_rate = 1e-4  # ours, untested at scale: 100x the policy's, the toy's ratio
    c.ppo.value_warmup_iterations = 2
    c.init_from = "/path/to/rejection_sampled_checkpoint"
    c.rlhf.reward_model = "/path/to/helpful_rm"
    c.rlhf.safety_reward_model = "/path/to/safety_rm"
    c.rlhf.prompts = "/path/to/prompts/*.jsonl"
    c.rlhf.eval_prompts = "/path/to/heldout_prompts/*.jsonl"
    c.rlhf.val_prompts = "/path/to/validation_prompts/*.jsonl"  # what early stopping reads
    c.rlhf.max_new_tokens = 1024
    c.total_steps = 8 * 400  # up to 400 iterations x 8 mini-batches (paper: 200-400, early-stopped)
    c.eval_every_steps = 8 * 10
    c.checkpoint_every_steps = 8 * 10  # iteration boundaries: a resumed run redoes no rollout
    c.early_stopping.metric = "val_reward"
    c.early_stopping.patience = 3  # 30 iterations without a better validation reward
    c.checkpoint.max_to_keep = 4  # the best survives the 3 saves that may follow it
    return c
