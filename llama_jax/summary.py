"""Architecture summary of the presets (or a Hugging Face directory), computed with
`jax.eval_shape` so that 70B costs no memory; then a real forward pass of the tiny model
on this machine's devices.

    python -m llama_jax.summary                 # all presets + tiny forward check
    python -m llama_jax.summary --preset=70b    # one preset
    python -m llama_jax.summary --hf=DIR        # a Hugging Face Llama directory
"""

from __future__ import annotations

import argparse
import sys
import time


def _row(name, cfg, n) -> str:
    gib = lambda b: f"{b * n / 2**30:8.1f}"  # noqa: E731
    return (f"{name:>6} {cfg.dim:>6} {cfg.n_layers:>4} {cfg.n_heads:>4} {cfg.kv_heads:>4} {cfg.hidden_dim:>6} "
            f"{cfg.vocab_size:>6} {n:>15,} {gib(4)} {gib(2)} {cfg.train_flops_per_token(cfg.max_seq_len) / 1e9:10.3g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama_jax.summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["tiny", "7b", "13b", "34b", "70b"], help="one preset (default: all)")
    ap.add_argument("--hf", help="a Hugging Face Llama directory (reads config.json only)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax import sharding
    from llama_jax.convert import ConversionError, config_from_hf
    from llama_jax.model import Llama, LlamaConfig, param_count

    if args.hf:
        import json
        import os

        try:
            with open(os.path.join(args.hf, "config.json")) as f:
                cfgs = {"hf": config_from_hf(json.load(f), source=os.path.join(args.hf, "config.json"))}
        except (OSError, ValueError, ConversionError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        names = [args.preset] if args.preset else ["tiny", "7b", "13b", "34b", "70b"]
        cfgs = {n: LlamaConfig.preset(n) for n in names}

    print(f"{'model':>6} {'dim':>6} {'L':>4} {'H':>4} {'K':>4} {'ffn':>6} {'vocab':>6} {'params':>15} "
          f"{'f32 GiB':>8} {'bf16 GiB':>8} {'GFLOP/tok':>10}")
    for name, cfg in cfgs.items():
        n = param_count(sharding.abstract_params(Llama(cfg)))  # eval_shape: no memory
        assert n == cfg.num_params(), (n, cfg.num_params())
        print(_row(name, cfg, n))
    print("(GFLOP/tok: training FLOPs per token at max_seq_len, causal attention)")

    if "tiny" in cfgs:
        cfg = cfgs["tiny"]
        mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
        params, _ = sharding.init_params(Llama(cfg), jax.random.key(0), mesh, sharding.DEFAULT_RULES)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64)))
        fwd = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t))
        with sharding.activate(mesh, sharding.DEFAULT_RULES):
            fwd(params, tokens).block_until_ready()
            t0 = time.perf_counter()
            logits = fwd(params, tokens).block_until_ready()
        dt = time.perf_counter() - t0
        print(f"tiny forward on {jax.device_count()} {jax.devices()[0].platform} device(s): logits "
              f"{tuple(logits.shape)} {logits.dtype}, {tokens.size / dt:,.0f} tokens/s, "
              f"finite={bool(jnp.isfinite(logits).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
