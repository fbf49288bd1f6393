"""Supervised fine-tuning in the Llama 2-Chat format (paper section 3.1): next-token loss
on answer tokens only (prompt tokens zeroed), dialogs packed into rows.

  tiny  python -m llama_jax.main --config=experiments/sft.py:tiny --workdir=runs/sft \\
            --config.init_from=runs/tiny
        Any CPU (2 cores: ~16 minutes). Fine-tunes the tiny pretrained model (the README's
        main job) on the seeded toy chat tasks (arithmetic, copy, reverse, sort; system
        instructions; refusals; 6% about the generic safety preprompt: adversarial requests
        refused under it and done without it, tasks answered under it,
        data.synthetic_safety_system), written to WORKDIR/data. Expected: held-out exact match
        from 0% before SFT to ~80% (README, "Fine-tuning on the toy tasks").
  7b | 13b | 34b | 70b
        python -m llama_jax.main --config=experiments/sft.py:7b --workdir=gcs/sft7b \\
            --config.init_from=gcs/pretrain7b --config.data.source='gcs/sft/*.jsonl'
        The paper's settings: cosine schedule from LR 2e-5, weight decay 0.1, batch 64 x
        4096 tokens, 2 epochs (config.epochs=2: total_steps is set at the start from the
        packed rows of your data, and printed; --config.epochs=0 uses total_steps).
        What fits (launch/aot_compile.py, per device; a v5p-N slice has N/2 chips): 7b on
        64 v5p chips as is (31.8 GiB of 95); on 128, the 64-row batch needs
        --config.mesh.fsdp=64 --config.mesh.tensor=2 (7b 18.1 GiB, 13b 27.2, 34b 46.8); on
        32 H100s, 7b as is (62.1 GiB of 80), 13b --config.grad_accum_steps=2 (52.5), 34b 4
        with fsdp=16 x tensor=2 (62.7); 70b on 256 v5p chips fsdp=64 x tensor=4 (20.9 GiB),
        on 512 fsdp=64 x tensor=8 (18.0). Rejection sampling, GAtt, distillation and PPO
        train the same step; the models they hold beside it (reference, reward models, a
        sampling copy) come on top.
"""

from llama_jax.configs import chat_config, paper_scale


def get_config(arg: str = "tiny"):
    c = chat_config()
    c.stage = "sft"
    if arg == "tiny":
        c.init_from = "runs/tiny"
        c.data.synthetic_train = 40_000  # fewer examples over-fit: 4,000 gave 55% exact match
        c.total_steps = 2400
        c.batch_size = 16
        c.seq_len = 256
        c.log_every_steps = 20
        c.eval_every_steps = 800
        c.eval_steps = 8
        c.checkpoint_every_steps = 800
        c.optimizer.learning_rate = 2e-3
        c.optimizer.warmup_steps = 20
        c.eval_max_new_tokens = 24
        return c
    if arg not in ("7b", "13b", "34b", "70b"):
        raise ValueError(f"experiments/sft.py: unknown arg {arg!r}; use tiny, 7b, 13b, 34b or 70b")
    c.init_from = "/path/to/pretrained"  # override: a pretraining run or a converted checkpoint
    paper_scale(c, arg, batch_size=64)
    c.epochs = 2.0  # the paper's: total_steps is set from the data at the start (packed rows, estimated)
    c.total_steps = 2 * 27_540 // 64  # what tools that read no data (aot_compile) size: 27,540 dialogs one a row
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 200
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 0  # unspecified in the paper
    c.data.source = "/path/to/sft/*.jsonl"
    c.data.synthetic_train = 0
    c.eval_exact_match = 0
    return c
