"""Direct Preference Optimization (Rafailov et al. 2023; beyond the paper): the policy
starts from a chat model and is trained on preference pairs against a frozen copy of it.

  tiny  python -m llama_jax.main --config=experiments/dpo.py:tiny --workdir=runs/dpo \\
            --config.init_from=runs/sft
        Any CPU (2 cores: ~2 minutes), the toy preference pairs. Expected: held-out
        preference accuracy (the implicit reward ranks chosen above rejected) well above 50%.
  7b | 13b | 34b | 70b
        --config.init_from=SFT_CHECKPOINT --config.data.source='prefs/*.jsonl'; LR 5e-7,
        beta 0.1, batch 64 pairs (common DPO settings; the paper has no DPO).
        What fits (launch/aot_compile.py, per device): on 128 v5p chips, 7b and 13b with
        --config.mesh.fsdp=64 --config.mesh.tensor=2 (34.9 / 51.6 GiB of 95), 34b with
        --config.grad_accum_steps=2 and fsdp=32 x tensor=4 (59.8); 70b on 512 v5p chips
        with fsdp=64 x tensor=8 (33.7).
"""

import ml_collections

from llama_jax.configs import chat_config, paper_scale


def get_config(arg: str = "tiny"):
    c = chat_config()
    c.stage = "dpo"
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # strength of the KL anchor to the reference policy
    c.eval_exact_match = 0
    c.optimizer.schedule = "constant"
    if arg == "tiny":
        c.init_from = "runs/sft"
        c.data.synthetic_train = 4000
        c.data.synthetic_eval = 400
        c.batch_size = 16
        c.total_steps = 250
        c.seq_len = 128
        c.log_every_steps = 10
        c.eval_every_steps = 125
        c.eval_steps = 25
        c.checkpoint_every_steps = 125
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 10
        return c
    if arg not in ("7b", "13b", "34b", "70b"):
        raise ValueError(f"experiments/dpo.py: unknown arg {arg!r}; use tiny, 7b, 13b, 34b or 70b")
    c.init_from = "/path/to/sft_checkpoint"
    paper_scale(c, arg, batch_size=64)
    c.data.source = "/path/to/preferences/*.jsonl"
    c.total_steps = 2000
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 150
    return c
