"""Pretraining (paper section 2): next-token loss on packed documents.

  tiny  python -m llama_jax.main --config=experiments/pretrain.py:tiny --workdir=runs/tiny
        Any CPU (2 cores: ~2 minutes). The embedded default corpus (this Python's standard
        library), a 2048-piece tokenizer trained into the workdir, a 1.3M-parameter model,
        600 steps of 8 x 256 tokens. Expected: held-out loss ~4.4 nats/token against a
        unigram baseline of ~6.1 (see README, "Pretraining on the embedded default").
  7b    --config=experiments/pretrain.py:7b --config.data.source=shards:gcs/shards
        The paper's recipe: 4M-token batches (1024 x 4096), peak LR 3e-4, 2000 warmup
        steps, cosine to 10%, ~477k steps for 2T tokens.
  13b   same as 7b with 13B shapes (peak LR 3e-4).
  34b   peak LR 1.5e-4, GQA (8 kv heads); shapes from Code Llama 34B (the paper gives none).
  70b   peak LR 1.5e-4, GQA. Full remat and FSDP over all chips.

A 1024 x 4096 batch fits no chip in one pass: set config.grad_accum_steps for yours.
What fits (launch/aot_compile.py's per-device total; a v5p-N slice has N/2 chips, and JAX
counts chips):
  7b    64 v5p chips (v5p-128): --config.grad_accum_steps=8 (60.5 GiB of 95);
        128 v5p chips: 4 (59.5 GiB); 32 H100s: 16 (62.4 GiB of 80)
  13b   128 v5p chips: 8 (46.6 GiB); 32 H100s: 32 (52.6 GiB)
  34b   128 v5p chips: 8 (76.7 GiB); 32 H100s: 64 with --config.mesh.fsdp=16
        --config.mesh.tensor=2 (62.7 GiB; pure FSDP at one row a device takes 91.9)
  70b   256 v5p chips (v5p-512): 2 (60.2 GiB); 512 v5p chips: 1 (56.1 GiB). 256 v5e
        chips (16 GiB) fit it at no setting measured (best 21.0 GiB: 32, fsdp=32 x tensor=8).

The big presets assume a pre-tokenized corpus (`python -m llama_jax.data.prepare`) and a
Llama 2 tokenizer (`--config.data.tokenizer=/path/tokenizer.model`); their mesh is pure
FSDP (`fsdp=-1`) with bfloat16 compute; change `mesh.*` for tensor parallelism. Attention
is `auto` (cuDNN flash attention on GPUs, the einsums elsewhere); on TPUs
`--config.model.attention=splash` runs the Pallas Splash kernel instead (no score tensor;
not yet measured on a TPU, see the README's model section).
"""

from llama_jax.configs import base_config, model_config, paper_scale
from llama_jax.model import LlamaConfig

PAPER_PEAK_LR = {"7b": 3e-4, "13b": 3e-4, "34b": 1.5e-4, "70b": 1.5e-4}


def get_config(arg: str = "tiny"):
    c = base_config()
    c.stage = "pretrain"
    if arg == "tiny":
        c.model = model_config(LlamaConfig.tiny(vocab_size=2048))
        c.total_steps = 600
        c.batch_size = 8
        c.seq_len = 256
        c.log_every_steps = 20
        c.eval_every_steps = 150
        c.eval_steps = 32  # the whole held-out split
        c.checkpoint_every_steps = 150
        c.optimizer.learning_rate = 3e-3
        c.optimizer.warmup_steps = 40
        c.sample.prompt = "def "
        return c
    if arg not in PAPER_PEAK_LR:
        raise ValueError(f"experiments/pretrain.py: unknown arg {arg!r}; use tiny, 7b, 13b, 34b or 70b")
    paper_scale(c, arg, batch_size=1024)  # 1024 x 4096 = 4M tokens per step
    c.total_steps = 477_000  # 2.0T tokens / 4M tokens per step
    c.eval_every_steps = 2000
    c.eval_steps = 16
    c.checkpoint_every_steps = 1000
    c.checkpoint.keep_period = 50_000
    c.optimizer.learning_rate = PAPER_PEAK_LR[arg]
    c.optimizer.warmup_steps = 2000
    c.data.source = "shards:/path/to/shards"  # override: prepared with llama_jax.data.prepare
    c.data.eval_source = ""  # none: set one (e.g. held-out shards) to evaluate every eval_every_steps
    c.data.tokenizer = "/path/to/tokenizer.model"  # override: Llama 2's tokenizer.model
    return c
