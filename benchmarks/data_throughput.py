"""Input pipeline throughput against what the tiny model's training step consumes.

    python benchmarks/data_throughput.py [--seq_len=256 --batch_size=8 --seconds=10]

Trains a 512-piece tokenizer on part of the embedded corpus (the standard library), or
takes --tokenizer, then measures, in one process:
  * pipeline: tokens/s of packed pretraining batches from the embedded corpus, or from
    --source=SPEC (tokenize, pack, batch, with the default prefetch), read as fast as
    possible;
  * step: tokens/s of a jitted forward+backward+AdamW step of LlamaConfig.tiny() on
    batches of the same shape (the model the CPU demo trains; its vocabulary the
    tokenizer's, at least 512).
The pipeline must deliver at least 10x the tokens/s the step consumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    from llama_jax.cli import DefaultsHelp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelp)
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    ap.add_argument("--batch_size", type=int, default=8, help="rows per batch")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to read batches")
    ap.add_argument("--source", default="stdlib", help="the pretraining source to read, as a run's data.source "
                                                       "(shards:DIR needs --tokenizer, the one they were made with)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.model to read --source with (default: one of 512 "
                                                      "pieces trained on the embedded corpus)")
    args = ap.parse_args(argv)
    if args.seq_len < 2 or args.batch_size < 1 or not args.seconds > 0:
        ap.error(f"--seq_len must be >= 2, --batch_size >= 1 and --seconds > 0; got {args.seq_len}, "
                 f"{args.batch_size}, {args.seconds}")

    import jax
    import jax.numpy as jnp
    import optax

    from llama_jax import metrics
    from llama_jax import tokenizer as tk
    from llama_jax.data import pretrain
    from llama_jax.data.sources import DataError, StdlibCorpus
    from llama_jax.model import Llama, LlamaConfig

    print("command: python benchmarks/data_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {metrics.cpu_description()}; jax {jax.__version__} ({jax.local_device_count()} device, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')}); batch {args.batch_size} x seq {args.seq_len}",
          flush=True)
    B, T = args.batch_size, args.seq_len
    try:  # a missing tokenizer or source: one line
        if args.tokenizer:
            tok = tk.Tokenizer(args.tokenizer)
        else:
            corpus = StdlibCorpus("train")
            with tempfile.TemporaryDirectory() as d:
                sample = os.path.join(d, "sample.txt")
                with open(sample, "w") as f:
                    f.write("\n".join(corpus[i] for i in range(0, len(corpus), 10)))
                tok = tk.train([sample], 512, os.path.join(d, "tok.model"))
        batches = pretrain.make_dataset(args.source, tok, T, B, seed=0)
        next(batches)  # warm-up
    except (tk.TokenizerError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        n += next(batches)["tokens"].size
    pipe = n / (time.perf_counter() - t0)

    cfg = LlamaConfig.tiny(vocab_size=max(512, tok.vocab_size))
    model = Llama(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    opt = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(ce * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    params, opt_state, loss = step(params, opt_state, batch)
    loss.block_until_ready()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        params, opt_state, loss = step(params, opt_state, batch)
        loss.block_until_ready()
        steps += 1
    train = steps * B * T / (time.perf_counter() - t0)
    print(f"pipeline ({args.source}, packed): {pipe:12,.0f} tokens/s")
    print(f"tiny train step (fwd+bwd+AdamW):    {train:12,.0f} tokens/s")
    print(f"ratio pipeline / step:              {pipe / train:12.1f}x (target >= 10x)")
    return 0 if pipe >= 10 * train else 1


if __name__ == "__main__":
    sys.exit(main())
