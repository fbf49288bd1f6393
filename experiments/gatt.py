"""Ghost Attention (paper 3.3): multi-turn dialogs whose answers were sampled with the
instruction present, trained with the instruction in the first turn only and the loss
on the last turn only, so that the model keeps obeying a system instruction many turns
later.

  tiny  python -m llama_jax.main --config=experiments/gatt.py:tiny --workdir=runs/gatt \\
            --config.init_from=runs/ppo
        Any CPU (~6 minutes). 2,000 synthesised toy dialogs (1-12 turns; upper case /
        start with / end with a word, drawn 1:1:2, 10% start+end combined, 20% in short
        form; a turn that breaks the instruction is resampled up to 7 times, and the
        dialog is cut before a turn that still breaks it); every turn of a kept dialog
        trains (the paper: the last only; --config.data.last_turn_only=true).
        Expected (WORKDIR/gatt.json, eval_adherence_turn_N): adherence at turns 4 and
        later rises from the baseline (paper Table 30: 10% -> 100% at turn 4) to >= 90%
        (README: the recipe's numbers).
  7b | 13b | 34b | 70b
        --config.init_from=LATEST_RLHF_CHECKPOINT (the paper applies GAtt after RLHF V3);
        the toy instructions stand in for the paper's hobby / language / public-figure
        constraints, which need a judge rather than code to check.
"""

from llama_jax.configs import paper_scale, rlhf_config


def get_config(arg: str = "tiny"):
    c = rlhf_config()
    c.stage = "gatt"
    c.data.last_turn_only = True  # loss on the last turn only (paper)
    c.data.pack = True
    c.eval_exact_match = 0
    c.rlhf.temperature = 0.0  # the toy model's greedy answers are its most adherent
    if arg == "tiny":
        c.init_from = "runs/ppo"
        c.gatt.max_turns = 12  # dialogs of 1-12 turns: the no-GAtt model has seen at most 2
        c.gatt.samples_per_turn = 8  # up to 7 resamples of a turn that breaks the instruction
        c.gatt.retry_temperature = 1.0
        # "end with the word X" is the instruction the toy model obeys least (word tasks: ~50% at turn 1),
        # so its dialogs are cut shortest: drawn twice as often, its trained turns match the others'
        c.gatt.instruction_weights = "upper:1,start:1,end:2"
        c.gatt.combined_prob = 0.1  # the tiny model rarely obeys combined / short forms it never saw in SFT,
        c.gatt.short_prob = 0.2  # so most such dialogs would be dropped: fewer of them, more kept dialogs
        # without them the instruction-only dialogs teach the toy model to add words to every answer: asked with no
        # instruction, its copy / reverse / sort accuracy fell from ~100% to ~30% (seed 0, session 21)
        c.gatt.plain_anchors = 1000
        c.data.last_turn_only = False  # ours for the CPU budget: every (adherent) turn trains; true = the paper
        c.batch_size = 8
        c.seq_len = 512  # a 12-turn dialog is ~330 tokens with the recipe's tokenizer, ~500 without
        c.total_steps = 250
        c.log_every_steps = 10
        c.eval_every_steps = 0
        c.checkpoint_every_steps = 250
        c.optimizer.learning_rate = 6e-4
        c.optimizer.warmup_steps = 10
        c.optimizer.schedule = "constant"
        c.eval_max_new_tokens = 16
        c.gatt.eval_turns = "2,4,6,8,12"  # turn 20 does not fit the tiny model's 512-token context
        return c
    if arg not in ("7b", "13b", "34b", "70b"):
        raise ValueError(f"experiments/gatt.py: unknown arg {arg!r}; use tiny, 7b, 13b, 34b or 70b")
    paper_scale(c, arg, batch_size=64)
    c.init_from = "/path/to/rlhf_checkpoint"
    c.total_steps = 500
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 20
    c.eval_max_new_tokens = 256
    return c
