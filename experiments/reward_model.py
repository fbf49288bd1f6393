"""Helpfulness and safety reward models (paper section 3.2.2): a chat model's trunk with a
scalar head, trained one epoch with L = -log sigmoid(r_chosen - r_rejected - m(rating)).

  tiny         python -m llama_jax.main --config=experiments/reward_model.py:tiny --workdir=runs/rm \\
                   --config.init_from=runs/sft
               Helpfulness RM on the toy preference pairs (10% safety pairs), small margin.
               Any CPU (2 cores: ~3 minutes). Expected: >= 90% accuracy on held-out
               "significantly better" pairs, falling towards 50% as the rating gap shrinks.
  safety_tiny  The safety variant: 90% safety pairs, the auxiliary safety term on. Reports
               unsafe-response recall at the 0.5 threshold.
  7b | 13b | 34b | 70b  (helpfulness; add --config.reward.safety_weight=1 and a safety mix
               for the safety model)
               --config.init_from=CHAT_CHECKPOINT \\
               --config.data.source='meta_helpful/*.jsonl@1,meta_safety/*.jsonl@F,open_source/*.jsonl@G'
               (the mixture sets the data mix; a fraction takes that share of its source's
               pairs, so the paper's "an equal amount" sampled from safety and open-source
               data is F = H / (2 S) and G = H / (2 O) for H helpful, S safety and O
               open-source pairs; the safety model: all of Meta Safety and Anthropic
               Harmless, with helpfulness pairs as 10% of the mix)
               The paper's settings: 1 epoch (config.epochs=1: total_steps is set from the
               pairs at the start), max LR 1e-5 (5e-6 for 70B), cosine to 10%, warmup 3% of
               steps (at least 5), 512 pairs per batch.
               What fits (launch/aot_compile.py, per device): on 128 v5p chips, 7b
               --config.grad_accum_steps=4 (59.3 GiB of 95), 13b 8 with
               --config.mesh.fsdp=64 --config.mesh.tensor=2 (51.2), 34b 16 with fsdp=32 x
               tensor=4 (58.1); 70b on 512 v5p chips as is (54.9).

Margin ablation (paper Table 28): --config.reward.margin=none|small|large.
The auxiliary safety term (the paper names it, A.3.4, without a formula) is a binary
cross-entropy pulling sigmoid(r) to 1 for responses labelled safe and 0 for unsafe ones,
weighted by reward.safety_weight (objectives.ranking).
"""

import ml_collections

from llama_jax.configs import chat_config, paper_scale


def get_config(arg: str = "tiny"):
    c = chat_config()
    c.stage = "reward_model"
    c.reward = ml_collections.ConfigDict()
    c.reward.margin = "small"  # m(rating) table: none | small (1, 2/3, 1/3, 0) | large (3, 2, 1, 0)
    c.reward.safety_weight = 0.0  # auxiliary safety loss weight (safety RM: 1.0)
    # pairs from the policy's own answers, labelled by the toy tasks' code checks (synthetic data only):
    c.reward.policy_prompts = 0  # toy prompts the policy answers (0 = none; a held-out eighth, at least 32)
    c.reward.policy = ""  # the policy that answers ("" = init_from)
    c.reward.policy_samples = 4  # answers per prompt
    c.reward.policy_temperature = 1.0
    c.reward.policy_max_new_tokens = 32
    c.reward.policy_pairs_per_prompt = 2
    c.reward.policy_fraction = 1.0  # mixture fraction of those pairs (above 1 repeats them)
    c.eval_exact_match = 0
    if arg in ("tiny", "safety_tiny"):
        c.init_from = "runs/sft"
        c.data.synthetic_train = 8000
        c.data.synthetic_eval = 800
        c.batch_size = 32
        c.total_steps = 250  # one epoch of 8000 pairs
        c.seq_len = 128
        c.log_every_steps = 10
        c.eval_every_steps = 125
        c.eval_steps = 25
        c.checkpoint_every_steps = 125
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 8  # 3%
        if arg == "safety_tiny":
            c.data.synthetic_mix = 0.9
            c.data.synthetic_adversarial = 0.5  # half the unsafe requests hidden in a task
            c.reward.safety_weight = 1.0
        return c
    if arg not in ("7b", "13b", "34b", "70b"):
        raise ValueError(f"experiments/reward_model.py: unknown arg {arg!r}; use tiny, safety_tiny, 7b, 13b, 34b, 70b")
    c.init_from = "/path/to/chat_checkpoint"
    paper_scale(c, arg, batch_size=512)
    c.data.source = "/path/to/preferences/*.jsonl"
    c.epochs = 1.0  # the paper's: total_steps is set from the pairs at the start (and the warm-up with it)
    c.total_steps = 2_919_326 // 512  # what tools that read no data size: one epoch of the Table 6 comparisons
    c.optimizer.learning_rate = 5e-6 if arg == "70b" else 1e-5
    # 3% of total_steps, at least 5 (the paper), of a total_steps set on the command line too: a field reference,
    # and max(a, 5) written as (a + 5 + |a - 5|) / 2, which references support
    three = c.get_ref("total_steps") * 3 // 100
    c.optimizer.warmup_steps = (three + 5 + abs(three - 5)) // 2
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    return c
