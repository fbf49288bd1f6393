"""Training throughput: the llama_jax train step against Hugging Face `LlamaForCausalLM`
with PyTorch's AdamW, same model, same batch, in one process.

    python benchmarks/train_throughput.py [--steps=5] [--batch=8] [--seq=256] [--autocast_steps=N|0]

Reference config (issue 9): dim 512, 8 layers, 8 heads, FFN by Meta's formula (1536),
vocab 32000, sequence 256, batch 8. llama_jax runs the step `python -m llama_jax.main`
runs (next-token loss, the paper's AdamW with clipping, donated state, scan over layers,
float32, and `dtype="bfloat16"`: bfloat16 matmuls, float32 params, norms and softmax);
HF runs float32, and float32 under `torch.autocast(bfloat16)` (PyTorch's fastest CPU
setting). llama_jax runs twice in float32: with the model defaults (layers scanned; on a
CPU our hand-written MLP and output-head backward passes, `mlp_backward` and
`head_backward` "auto"), and with the CPU settings (`model.scan_layers=false`,
`model.mlp_backward=auto`, `model.head_backward=auto`: the same with the layers
unrolled), the configuration a CPU run should use; its bfloat16 row uses the CPU settings too. The
ratios at the end compare that configuration with HF. All start from the same weights. The
first two steps of each (compilation, allocation) are excluded; the timed steps
alternate between them (a busy machine slows all alike), each after an untimed step of
its own (the first step after another program's costs more), and the median of `--steps`
steps each is reported as tokens per second, with model FLOP/s as a share of this
machine's float32 matmul peak, measured here: the faster of XLA's and PyTorch's 2048^3
float32 matmul (bfloat16 rows can pass 100%: the peak is float32's).

Memory: XLA:CPU allocates each step's temporaries (2.3 GB here) fresh, and glibc maps
such large blocks anew on every call: ~600,000 page faults a step. Run with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35: transparent huge pages for those
blocks) to cut that for both sides alike; the header says which allocator setting ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _timed(fns: dict, steps: dict, warmup: dict) -> dict:
    """Median seconds per call of each fn, after `warmup[name]` untimed calls, over
    `steps[name]` timed ones; the timed calls alternate between the fns (a fn with fewer
    steps drops out), so on a shared machine a burst of load slows every side alike. Each
    timed call follows an untimed one of the same fn: the first step after another
    program's pays for memory that program left mapped differently (measured: the
    unrolled llama_jax step 4.1-4.2 s right after the scanned one's, 2.7 s after its
    own), a cost a training run, which repeats one step, never has. Each call's time goes
    to stderr as it ends (a step can take minutes on a CPU without bfloat16 units)."""
    for name, fn in fns.items():
        for i in range(warmup[name]):
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            print(f"  warm-up {i + 1}/{warmup[name]} {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    times = {name: [] for name in fns}
    for step in range(max(steps.values())):
        for name, fn in fns.items():
            if step >= steps[name]:
                continue
            fn()  # untimed: back on this fn's program (see the docstring)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"  step {step + 1}/{steps[name]} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    from llama_jax.cli import DefaultsHelp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelp)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each implementation (their median)")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (2..512)")
    ap.add_argument("--autocast_steps", type=int, default=None,
                    help="timed steps of HF autocast bfloat16, after one warm-up (default: --steps after 2; 0: "
                         "leave it out); on a CPU without bfloat16 units (AVX-512 BF16, AMX) one step takes minutes")
    args = ap.parse_args(argv)
    if args.steps < 1 or (args.autocast_steps is not None and args.autocast_steps < 0):
        ap.error("--steps must be >= 1 and --autocast_steps >= 0 (the median of the timed steps is reported)")
    if args.batch < 1 or not 2 <= args.seq <= 512:
        ap.error(f"--batch must be >= 1 and --seq in [2, 512] (the model's context), got {args.batch} and {args.seq}")

    import jax
    import ml_collections
    import numpy as np
    import torch
    import transformers

    from llama_jax import convert, metrics, sharding, train
    from llama_jax.data.pipeline import lm_example
    from llama_jax.model import Llama, LlamaConfig
    from llama_jax.objectives import next_token

    cfg = LlamaConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=512)
    model = Llama(cfg)
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    params, param_sh = sharding.init_params(model, jax.random.key(0), mesh, sharding.DEFAULT_RULES)
    with tempfile.TemporaryDirectory() as d:
        convert.to_hf(params, cfg, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    hf.train()

    opt_cfg = ml_collections.ConfigDict(dict(learning_rate=3e-4, schedule="constant", warmup_steps=0,
                                             final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1,
                                             clip_norm=1.0))
    optimizer = train.make_optimizer(opt_cfg, 1000)
    abstract = jax.eval_shape(lambda p: train.init_state(p, optimizer), params)
    state_sh = train.state_shardings(abstract, param_sh, mesh)
    def make_apply(m):
        def apply_fn(p, tokens, positions, segment_ids):
            return m.apply({"params": p}, tokens, positions, segment_ids)
        return apply_fn

    rng = np.random.default_rng(0)
    rows = [lm_example(rng.integers(3, cfg.vocab_size, args.seq), np.ones(args.seq, bool),
                       np.ones(args.seq, np.int32), np.arange(args.seq)) for _ in range(args.batch)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch_sh = {k: sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, v.shape) for k, v in batch.items()}
    device_batch = jax.device_put(batch, batch_sh)

    cpu_settings = dict(scan_layers=False, mlp_backward="auto", head_backward="auto")

    def ours(dtype: str, **settings):
        m = Llama(cfg.replace(dtype=dtype, **settings))
        step = train.jit_train_step(train.make_train_step(make_apply(m), next_token, optimizer), state_sh, batch_sh,
                                    mesh, sharding.DEFAULT_RULES)
        copy = jax.tree_util.tree_map(lambda a: a.copy(), params)  # the state is donated
        holder = {"state": jax.jit(lambda p: train.init_state(p, optimizer), out_shardings=state_sh)(copy)}

        def run():
            holder["state"], metrics = step(holder["state"], device_batch)
            jax.block_until_ready(metrics["loss"])
        return run

    torch_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    ids = torch.from_numpy(batch["tokens"].astype(np.int64))

    def theirs(autocast: bool):
        def run():
            torch_opt.zero_grad(set_to_none=True)
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = hf(input_ids=ids, labels=ids).loss
            else:
                loss = hf(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            torch_opt.step()
        return run

    peak_xla = metrics.measure_cpu_peak()
    a = torch.ones(2048, 2048)
    torch_times = []
    for _ in range(6):
        start = time.perf_counter()
        a @ a
        torch_times.append(time.perf_counter() - start)
    peak_torch = 2 * 2048 ** 3 / min(torch_times[1:])
    peak = max(peak_xla, peak_torch)
    tokens = args.batch * args.seq
    flops = cfg.train_flops_per_token(args.seq) * tokens
    print("command: python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {metrics.cpu_description()}; jax {jax.__version__} ({jax.local_device_count()} device, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')}: every core), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"config: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.hidden_dim}, vocab "
          f"{cfg.vocab_size}; batch {args.batch} x {args.seq}; AdamW; median of {args.steps} "
          f"step{'s' if args.steps > 1 else ''} after 2")
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s, the faster of XLA's {peak_xla / 1e9:.1f} and "
          f"PyTorch's {peak_torch / 1e9:.1f}; model FLOPs per step {flops / 1e9:.1f} G")
    fns = {"llama_jax f32, defaults": ours("float32"), "llama_jax float32": ours("float32", **cpu_settings),
           "HF float32": theirs(False), "llama_jax bfloat16": ours("bfloat16", **cpu_settings),
           "HF autocast bfloat16": theirs(True)}
    steps, warmup = dict.fromkeys(fns, args.steps), dict.fromkeys(fns, 2)
    if args.autocast_steps == 0:
        for d in (fns, steps, warmup):
            del d["HF autocast bfloat16"]
        print("HF autocast bfloat16: left out (--autocast_steps=0)")
    elif args.autocast_steps is not None:
        steps["HF autocast bfloat16"], warmup["HF autocast bfloat16"] = args.autocast_steps, 1
        print(f"HF autocast bfloat16: median of {args.autocast_steps} steps after 1 (--autocast_steps)")
    results = _timed(fns, steps, warmup)
    ours_tps = tokens / results["llama_jax float32"]
    settings = ", ".join(f"{k}={str(v).lower()}" for k, v in cpu_settings.items())
    print(f"llama_jax float32 and bfloat16: the CPU settings ({settings})")
    print(f"{'implementation':<24} {'s/step':>8} {'tokens/s':>10} {'FLOP/s / f32 peak':>20} "
          f"{'llama_jax f32 / it':>19}")
    for name, seconds in results.items():
        tps = tokens / seconds
        print(f"{name:<24} {seconds:>8.3f} {tps:>10.0f} {flops / seconds / peak:>19.1%} {ours_tps / tps:>18.2f}x")
    f32 = results["HF float32"] / results["llama_jax float32"]
    cpu = results["llama_jax f32, defaults"] / results["llama_jax float32"]
    bf16 = (f"{results['HF autocast bfloat16'] / results['llama_jax bfloat16']:.2f}x"
            if "HF autocast bfloat16" in results else "not run")
    print(f"llama_jax float32 / HF float32: {f32:.2f}x; llama_jax bfloat16 / HF autocast bfloat16: {bf16}; "
          f"CPU settings / defaults: {cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
