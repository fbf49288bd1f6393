"""The base experiment config every `experiments/*.py` starts from.

Every field has a one-line comment; experiments change only what differs. Any field can
be overridden on the command line: `--config.optimizer.learning_rate=1e-4`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from llama_jax import sharding
from llama_jax.model import LlamaConfig


def model_config(cfg: LlamaConfig) -> ml_collections.ConfigDict:
    """LlamaConfig fields as a ConfigDict; optional fields become typed placeholders so
    that `--config.model.n_kv_heads=8` works when the preset has None."""
    out = ml_collections.ConfigDict()
    optional_types = {"n_kv_heads": int, "ffn_dim_multiplier": float, "ffn_hidden_dim": int}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            value = config_dict.placeholder(optional_types[f.name])
        elif f.name in ("norm_eps", "rope_theta") or f.name in optional_types and optional_types[f.name] is float:
            value = float(value)
        setattr(out, f.name, value)
    return out


def to_llama_config(model_cfg: ml_collections.ConfigDict) -> LlamaConfig:
    """The boundary: experiment ConfigDict -> frozen LlamaConfig (validated)."""
    return LlamaConfig.from_dict(model_cfg.to_dict())


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # which stage main.py runs
    c.seed = 0  # parameter init and data order
    c.total_steps = 1000  # optimizer steps in the whole run
    # > 0: total_steps is set at the start from the training data instead, to this many passes over it (the
    # paper's SFT: 2, reward models: 1): ceil(epochs x the rows one pass makes / batch_size); fine-tuning data only
    c.epochs = 0.0
    c.batch_size = 8  # global batch (rows of seq_len tokens) per optimizer step
    c.seq_len = 256  # tokens per row
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)
    c.log_every_steps = 10  # metrics.jsonl / TensorBoard / progress cadence
    c.eval_every_steps = 200  # held-out evaluation cadence (0 = only at the end)
    c.eval_steps = 8  # held-out batches per evaluation
    c.checkpoint_every_steps = 200  # checkpoint cadence (and always at the last step)
    c.init_from = ""  # params of another run/export to start from (e.g. SFT from pretraining)
    c.nonfinite_policy = "stop"  # on a NaN/Inf loss or gradient: "stop" (report, exit 1) or "skip" (count)

    c.early_stopping = ml_collections.ConfigDict()  # at each evaluation (eval_every_steps), from step 0
    c.early_stopping.metric = ""  # evaluation metric to keep the best of ("" = off), e.g. eval_loss, val_reward
    c.early_stopping.mode = "max"  # "max" or "min": which way the metric improves
    c.early_stopping.patience = 2  # stop after this many evaluations without improvement
    c.early_stopping.min_delta = 0.0  # an improvement must beat the best by more than this
    c.early_stopping.guard = ""  # higher-is-better metrics that must hold, comma-separated ("" = none)
    c.early_stopping.guard_tolerance = 0.0  # stop once a guard falls more than this below its step-0 value

    c.model = model_config(LlamaConfig.tiny())

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-4  # peak learning rate
    c.optimizer.schedule = "cosine"  # "cosine" (to final_lr_fraction) or "constant", both after warmup
    c.optimizer.warmup_steps = 2000  # linear warmup from 0
    c.optimizer.final_lr_fraction = 0.1  # cosine ends at this fraction of the peak
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-5
    c.optimizer.weight_decay = 0.1  # on weight matrices and embeddings, not norms or biases
    c.optimizer.clip_norm = 1.0  # global gradient norm clipping (0 = none)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel replicas
    c.mesh.fsdp = -1  # parameter/optimizer sharding (-1: the remaining devices)
    c.mesh.tensor = 1  # tensor parallelism over heads and MLP
    c.mesh.rules = tuple(sharding.DEFAULT_RULES)  # logical axis -> mesh axes
    # sample (PPO's rollouts, rejection sampling, GAtt, distillation, the RM's policy pairs, evaluations
    # that generate) from a copy of the model all-gathered over fsdp, split over tensor only (paper 3.2.3)
    c.mesh.gather_for_generation = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # stdlib | text:GLOB | jsonl:GLOB | shards:DIR | synthetic
    c.data.eval_source = "stdlib:eval"  # held-out documents ("" = no evaluation)
    c.data.tokenizer = ""  # SentencePiece .model; "" = WORKDIR/tokenizer.model, trained on the source if absent
    c.data.tokenizer_extra = ""  # comma-separated text-file globs a trained tokenizer also learns from
    c.data.prefetch = 2  # batches prepared ahead in a background thread

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = 3  # keep the last N checkpoints ...
    c.checkpoint.keep_period = 0  # ... and every K-th step (0 = none)
    c.checkpoint.async_save = True  # write in the background while training continues

    c.metrics = ml_collections.ConfigDict()
    c.metrics.peak_flops_per_device = 0.0  # for MFU; 0 = known chip table, or measured on CPU

    c.eval_exact_match = 0  # chat stages: held-out dialogs whose greedy answer is checked (0 = off)
    c.eval_max_new_tokens = 32  # answer length budget for that check

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""  # printed continuation at the end of the run ("" = none)
    c.sample.max_new_tokens = 64
    c.sample.temperature = 0.8
    c.sample.top_p = 0.95
    return c


def chat_config() -> ml_collections.ConfigDict:
    """Base for the fine-tuning stages (SFT, reward models, DPO): data fields for JSONL
    sources and for the seeded toy data written into the workdir."""
    c = base_config()
    c.data.source = "synthetic"  # JSONL glob, or "synthetic" (toy data written to WORKDIR/data)
    c.data.eval_source = ""  # held-out JSONL ("" with synthetic: the generated eval split)
    c.data.pack = True  # several dialogs per row (SFT); False = one per row, padded
    c.data.last_turn_only = False  # train only the final answer (Ghost Attention)
    c.data.synthetic_train = 4000  # toy training examples
    c.data.synthetic_eval = 200  # toy held-out examples (minus any whose prompt occurs in training)
    c.data.synthetic_mix = 0.1  # toy preference data: share of safety (refusal) pairs
    c.data.synthetic_adversarial = 0.0  # toy pairs and prompts: share of unsafe requests phrased adversarially
    # toy chat dialogs: share about the generic safety preprompt (synthetic.chat_example): adversarial requests
    # refused under it and done as tasks without it, and tasks answered under it, a third each
    c.data.synthetic_safety_system = 0.06
    c.eval_exact_match = 200
    c.sample.prompt = ""
    return c


def paper_scale(c: ml_collections.ConfigDict, arg: str, batch_size: int, seq_len: int = 4096) -> None:
    """What every 7b..70b experiment shares: bfloat16 compute, remat (full for 70B, else
    keep the weight matmuls' outputs), the batch shape, a log cadence for long runs, and
    sampling from a gathered copy of the model. The model is the preset's: a fine-tuning
    run trains its `init_from` checkpoint's architecture, and `launch/aot_compile.py` checks
    this one when that checkpoint is not at hand."""
    c.model = model_config(LlamaConfig.preset(arg))
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full" if arg == "70b" else "dots_no_batch"  # "dots" would keep [B,H,T,T] scores
    c.batch_size = batch_size
    c.seq_len = seq_len
    c.log_every_steps = 10
    # sampling gathers the model once instead of every layer at every token (paper 3.2.3); the copy takes
    # params / mesh.tensor per device (checked against the device's memory at the start)
    c.mesh.gather_for_generation = True


def rlhf_config() -> ml_collections.ConfigDict:
    """Base for the RLHF stages (rejection sampling, PPO): the chat fields plus the reward
    models, the prompts and how to sample."""
    c = chat_config()
    c.rlhf = ml_collections.ConfigDict()
    c.rlhf.reward_model = ""  # helpfulness RM (a reward_model run or export), or "code": the toy check (gold reward)
    c.rlhf.safety_reward_model = ""  # safety RM ("" = helpfulness only, no gating)
    c.rlhf.safety_threshold = 0.15  # R_c = safety score if the prompt is tagged or R_s < this (paper)
    c.rlhf.prompts = "synthetic"  # JSONL glob of prompts ({"messages": [...], "is_safety": bool}), or toy prompts
    c.rlhf.eval_prompts = ""  # held-out prompts ("" with synthetic: a generated held-out split)
    c.rlhf.num_prompts = 512  # toy prompts to generate (synthetic)
    c.rlhf.num_eval_prompts = 128
    c.rlhf.val_prompts = ""  # PPO: validation prompts (JSONL), answered at every evaluation (val_*)
    c.rlhf.num_val_prompts = 0  # ... at most this many (0 = all); with synthetic prompts and no val_prompts,
    #   this many toy ones (0 = none). The held-out eval_* prompts are then answered only before and after
    c.rlhf.eval_samples = 0  # also sample this many answers per held-out prompt at rlhf.temperature (0 = greedy only)
    c.rlhf.val_samples = -1  # PPO: the same for each validation prompt (-1 = eval_samples): keeps early stopping cheap
    c.rlhf.num_samples = 8  # K answers per prompt (rejection sampling)
    c.rlhf.temperature = 1.0  # sampling temperature (the paper re-tunes it each iteration)
    c.rlhf.top_p = 1.0
    c.rlhf.max_new_tokens = 32
    c.rlhf.selection_beta = 0.0  # rejection sampling keeps argmax logit(R) + beta * log pi(answer) (0 = paper)
    c.rlhf.pool = ""  # comma-separated earlier rejection-sampling workdirs whose best answers are pooled
    c.rlhf.min_reward = 0.0  # rejection sampling keeps a best answer only if its reward >= this (0 = paper: all)
    # sampled answers trained with an EOS appended (rejection sampling's best, GAtt's turns, safety distillation's)
    # must have ended with EOS within their token limit; false: a cut answer can be picked, and trains with an EOS
    c.rlhf.require_eos = True
    c.gatt = ml_collections.ConfigDict()
    c.gatt.num_dialogs = 2000  # synthesised multi-turn dialogs (toy instructions and tasks)
    c.gatt.max_turns = 3  # turns per synthesised dialog (1..max; only the last is trained)
    c.gatt.keep_only_adherent = True  # cut a dialog before its first answer that breaks the instruction (toy: by code)
    c.gatt.instruction_weights = ""  # "upper:1,start:1,end:2": how often each kind is drawn ("" = evenly)
    c.gatt.combined_prob = 0.3  # share of instructions combining two constraints (start + end)
    c.gatt.short_prob = 0.5  # share given in the short form ("Start: river.")
    c.gatt.samples_per_turn = 1  # tries per turn for an adherent answer (toy: checked by code; 1 = no retry)
    c.gatt.retry_temperature = 0.7  # sampling temperature of the retries
    c.gatt.num_eval_dialogs = 64
    # ours: toy tasks asked with no instruction, answered by init_from itself (greedy), mixed into the training
    # dialogs so that GAtt does not change what the model does without an instruction (0 = the paper's data alone)
    c.gatt.plain_anchors = 0
    c.gatt.num_plain_eval = 200  # held-out toy tasks asked with no instruction: true accuracy before and after
    c.gatt.eval_turns = "2,4,6,20"  # adherence reported at these turns (paper Table 30)
    c.distill = ml_collections.ConfigDict()
    c.distill.preprompt = "template"  # "generic" or "template" (with an answer template, paper Table 39)
    # "prefix": before the prompt's text (paper); "system": a system message; "prefix,system": one answer
    # with each, the safety RM's favourite of the two is the candidate
    c.distill.preprompt_position = "prefix"
    c.distill.num_prompts = 512  # adversarial prompts to distil
    # a preprompted answer is kept if the safety RM scores it above the answer without the preprompt
    # (paper) and, ours, at least this high (0 = the paper's rule alone; 0.5: one the RM calls safe)
    c.distill.min_safety = 0.0
    c.distill.benign_anchors = 256  # benign prompts answered by the model itself, mixed in (0 = paper)
    c.distill.num_eval_prompts = 128  # held-out unsafe and benign prompts each
    return c

