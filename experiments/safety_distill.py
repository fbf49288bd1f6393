"""Safety context distillation (paper 4.2.4): answers to adversarial prompts generated
with a safety preprompt, kept where the safety reward model prefers them to the answer
without it, then trained without the preprompt.

  tiny  python -m llama_jax.main --config=experiments/safety_distill.py:tiny --workdir=runs/distill \\
            --config.init_from=runs/gatt --config.rlhf.safety_reward_model=runs/rm_safety
        Any CPU (a few minutes). 512 toy adversarial requests (the unsafe request hidden in a
        "Repeat exactly:" or "Reverse the words:" task, which the toy SFT data refuses
        under the generic safety preprompt as system prompt and does as a task without
        it), 256 benign anchors;
        only answers the safety RM calls safe (>= 0.5) are kept (distill.min_safety).
        Expected
        (WORKDIR/safety_distill.json): the violation rate on held-out adversarial prompts
        falls; false refusals on benign prompts stay low.
  7b | 13b | 34b | 70b
        --config.rlhf.prompts='adversarial/*.jsonl' (safety-tagged) and
        --config.rlhf.eval_prompts='heldout/*.jsonl'; the paper distils adversarial prompts
        only (--config.distill.benign_anchors=0).
"""

from llama_jax.configs import paper_scale, rlhf_config


def get_config(arg: str = "tiny"):
    c = rlhf_config()
    c.stage = "safety_distill"
    c.eval_exact_match = 0
    c.data.pack = True
    if arg == "tiny":
        c.init_from = "runs/gatt"
        c.rlhf.safety_reward_model = "runs/rm_safety"
        c.data.synthetic_adversarial = 1.0  # the unsafe prompts hide the request in a task, which SFT does not refuse
        c.distill.preprompt = "generic"  # the toy model refuses with it; the long template confuses it
        # as a system message (in Llama 2's format the system prompt opens the first user turn, so it
        # still comes before the request): the GAtt-trained toy model obeys system instructions, and
        # refuses cleanly there; before the request's text it often garbles the refusal
        c.distill.preprompt_position = "system"
        # keep only answers the safety RM calls safe: on some trajectories the GAtt-trained toy model answers
        # any preprompt with upper-case word lists, which the RM scores low (median 0.01) but above compliance
        c.distill.min_safety = 0.5
        c.batch_size = 16
        c.seq_len = 256
        c.total_steps = 100
        c.log_every_steps = 10
        c.eval_every_steps = 0
        c.checkpoint_every_steps = 100
        c.optimizer.learning_rate = 3e-4
        c.optimizer.warmup_steps = 10
        c.optimizer.schedule = "constant"
        return c
    if arg not in ("7b", "13b", "34b", "70b"):
        raise ValueError(f"experiments/safety_distill.py: unknown arg {arg!r}; use tiny, 7b, 13b, 34b or 70b")
    paper_scale(c, arg, batch_size=64)
    c.init_from = "/path/to/chat_checkpoint"
    c.rlhf.safety_reward_model = "/path/to/safety_rm"
    c.rlhf.prompts = "/path/to/adversarial/*.jsonl"
    c.rlhf.eval_prompts = "/path/to/heldout/*.jsonl"
    c.distill.benign_anchors = 0
    c.total_steps = 500
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 20
    c.eval_max_new_tokens = 256
    return c
