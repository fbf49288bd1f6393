"""GPU benchmark (issue 9): MFU of a 7B-shaped llama_jax training step in bfloat16, side by
side with Hugging Face `LlamaForCausalLM` (PyTorch, autocast bfloat16) on the same GPU, and
7B decode tokens/s against HF `generate`.

    python benchmarks/gpu_mfu.py [--layers=8] [--steps=10] [--out=gpu_results.jsonl] [--deadline=540]

The 7B shape (dim 4096, 32 heads, FFN 11008, vocab 32000, sequence 4096) trains with fewer
layers (`--layers`, default 8): float32 master weights plus AdamW's two moments take 16
bytes a parameter, 108 GB for all 32 layers. Runs, each in its own process (JAX and
PyTorch each reserve most of the GPU's memory, and a run that runs out of memory fails
alone), in this order:

  peak        bfloat16 matmul peak (8192^3, jitted) and device-to-device copy bandwidth
  check       cuDNN flash attention against the einsums on the GPU: logits and gradients
              of a small model on packed, padded rows
  train ...   llama_jax train steps (the step `python -m llama_jax.main` runs: next-token
              loss, clipping, AdamW, donated state): attention cudnn (batch 4) and xla
              (batch 2: its float32 score tensors fill the GPU at batch 4), then cudnn
              without the segment mask (`--mask=causal`: no bias, so no bias gradient)
  hf_train    HF LlamaForCausalLM, float32 weights, torch.autocast(bfloat16), SDPA
              attention (PyTorch's flash kernel), fused AdamW, clipping; batch 4
  decode      the full 7B (32 layers) in bfloat16: llama_jax `generate` and HF `generate`
              (with cache), prompt 32, 128 new tokens, greedy, batch 1 and 16
  then        cudnn at batch 8, decode with `decode_layers="stacked"`, cudnn at batch 2,
              and cudnn at batch 4 with XLA's Triton GEMMs off

All 32 layers (batch 2, full remat) ran out of memory on a 141 GB H200 (session 22).
Run one part alone with `--part=NAME` and its flags (`--attention`, `--batch`, `--seq`,
`--layers`, `--remat`, `--mask`, `--impl`, `--decode_layers`), `PYTHONPATH` at the repository.

Each train run: 2 untimed steps (compilation), then the median of `--steps`. MFU = model
FLOPs per token (6 N_matmul + 6 L T d, causal attention) x tokens/s / peak, against the
H100/H200 datasheet dense bfloat16 peak (989 TFLOP/s, `mfu_spec`); each run's `tflops`
over the `peak` run's measured matmul TFLOP/s gives the fraction of JAX's own matmul (the
README's "of JAX's matmul" column). Results go to stdout and, one JSON object a line, to `--out`; runs that would
start after `--deadline` seconds are skipped (the device is lent for minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SPEC_PEAK = 989e12  # H100 / H200 SXM dense bfloat16, datasheet (others: llama_jax.metrics.PEAK_FLOPS, --peak_tflops)
SHAPE = dict(dim=4096, n_heads=32, vocab_size=32000, max_seq_len=4096)
FFN = 11008
SMOKE = "--smoke" in sys.argv  # tiny shapes on any device, xla attention: to try the script itself on a CPU
if SMOKE:
    SHAPE, FFN = dict(dim=128, n_heads=4, vocab_size=512, max_seq_len=4096), 512  # FFN: Meta's formula for dim 128
TORCH_DEVICE = "cpu" if SMOKE else "cuda"


def _emit(out_path: str | None, record: dict) -> None:
    # which invocation of the driver (one id for all its runs: --out is appended to) and which command
    record = {**record, "run_id": os.environ.get("GPU_MFU_RUN_ID") or time.strftime("%Y%m%dT%H%M%S"),
              "argv": sys.argv[1:]}
    print("RESULT " + json.dumps(record), flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _timed(fn, steps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


NO_GPU = 3  # a part's exit status when it finds no GPU: the driver stops there


def _spec_peak(args, kind: str) -> float:
    """The datasheet dense bfloat16 peak MFU is a fraction of: --peak_tflops, else the
    device kind's in llama_jax.metrics.PEAK_FLOPS (H100, H200, A100, TPUs)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    from llama_jax.metrics import PEAK_FLOPS

    for key, value in PEAK_FLOPS:
        if key in kind.lower():
            return value
    if SMOKE:
        return SPEC_PEAK
    print(f"error: no datasheet peak for device {kind!r}: pass --peak_tflops", file=sys.stderr)
    sys.exit(NO_GPU)


def _require_gpu(framework: str) -> str:
    """The device kind, or exit NO_GPU: this script's shapes would take hours on a CPU."""
    if framework == "torch":
        import torch

        ok = torch.cuda.is_available()
        kind = torch.cuda.get_device_name(0) if ok else "cpu"
    else:
        import jax

        ok, kind = jax.default_backend() == "gpu", jax.devices()[0].device_kind
    if not ok and not SMOKE:
        print(f"error: no GPU visible to {framework} (device: {kind}); on a CPU, try the script with --smoke",
              file=sys.stderr)
        sys.exit(NO_GPU)
    return kind


def _hf_config(layers: int):
    """HF's config of the same shape, SDPA attention."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=SHAPE["dim"], intermediate_size=FFN, num_hidden_layers=layers,
                                   num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_heads"],
                                   vocab_size=SHAPE["vocab_size"], max_position_embeddings=SHAPE["max_seq_len"])
    cfg._attn_implementation = "sdpa"
    return cfg


# ----------------------------------------------------------------------------- parts ---

def part_peak(args) -> dict:
    import jax
    import jax.numpy as jnp

    _require_gpu("jax")
    n = 512 if SMOKE else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    t = statistics.median(_timed(lambda: mm(a).block_until_ready(), 20, 3))
    x = jnp.ones((64 if SMOKE else 1024, 1024, 1024), jnp.bfloat16)  # 2 GiB
    add = jax.jit(lambda y: y + 1)
    tc = statistics.median(_timed(lambda: add(x).block_until_ready(), 10, 2))
    import flax
    import optax

    dev = jax.devices()[0]
    return {"part": "peak", "device": dev.device_kind, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__,
            "matmul_tflops": 2 * n ** 3 / t / 1e12, "copy_tb_s": 2 * x.nbytes / tc / 1e12}


def part_check(args) -> dict:
    """cuDNN attention vs the einsums, bfloat16, packed + padded rows, GQA."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax import sharding
    from llama_jax.model import Llama, LlamaConfig

    kind = _require_gpu("jax")
    cfg = LlamaConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1000, max_seq_len=256,
                      dtype="bfloat16")
    params, _ = sharding.init_params(Llama(cfg), jax.random.key(0), sharding.make_mesh(1, 1, 1, jax.devices()[:1]),
                                     sharding.DEFAULT_RULES)
    T = 256
    toks = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    seg = np.ones((2, T), np.int32)
    seg[0, 100:] = 2
    seg[1, 200:] = 0
    pos = np.concatenate([np.arange(100), np.arange(T - 100)])[None].repeat(2, 0)
    pos[1] = np.arange(T)
    real = seg != 0

    def loss(c, p):
        logits = Llama(c).apply({"params": p}, toks, jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2) / real.sum(), logits

    res = {}
    for name, impl in (("xla", "xla"), ("cudnn", "xla" if SMOKE else "cudnn")):
        fn = jax.jit(jax.value_and_grad(lambda p, c=cfg.replace(attention=impl): loss(c, p), has_aux=True))
        res[name] = jax.device_get(fn(params))
    (lx, ox), gx = res["xla"]
    (lc, oc), gc = res["cudnn"]
    rel = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                    / (np.abs(np.asarray(a, np.float32)).max() + 1e-12))
              for a, b in zip(jax.tree_util.tree_leaves(gx), jax.tree_util.tree_leaves(gc)))
    # --smoke runs the einsums on both sides (no cuDNN on a CPU): its row says so, not loss_cudnn
    return {"part": "check", "device": kind, "loss_xla": float(lx),
            ("loss_xla_again" if SMOKE else "loss_cudnn"): float(lc),
            "logits_max_abs_diff": float(np.abs(ox - oc)[real].max()), "logits_max_abs": float(np.abs(ox)[real].max()),
            "grad_max_rel_diff": rel}


def part_train(args) -> dict:
    import types

    import jax
    import numpy as np

    from llama_jax import sharding, train
    from llama_jax.model import Llama, LlamaConfig
    from llama_jax.objectives import next_token

    kind = _require_gpu("jax")
    peak = _spec_peak(args, kind)  # now: an unknown device stops before minutes of work
    cfg = LlamaConfig(**SHAPE, n_layers=args.layers, dtype="bfloat16", attention=args.attention,
                      remat_policy=args.remat)
    if args.mask == "causal":
        # These rows are one unpadded segment each, so causal alone is the same attention as
        # the segment mask; without the mask, cuDNN gets no bias and its backward computes no
        # bias gradient (jax 0.10.2 computes one for any bias). Measures what the bias costs.
        real = jax.nn.dot_product_attention

        def causal_only(*a, mask=None, implementation=None, **kw):
            return real(*a, implementation="xla" if SMOKE else implementation, **kw)

        jax.nn.dot_product_attention = causal_only
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    model = Llama(cfg)
    params, param_sh = sharding.init_params(model, jax.random.key(0), mesh, sharding.DEFAULT_RULES)
    opt_cfg = types.SimpleNamespace(learning_rate=1e-5, schedule="constant", warmup_steps=0, final_lr_fraction=0.1,
                                    b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0)
    optimizer = train.make_optimizer(opt_cfg, 1000)
    abstract = jax.eval_shape(lambda p: train.init_state(p, optimizer), params)
    state_sh = train.state_shardings(abstract, param_sh, mesh)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    toks = rng.integers(3, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((B, T), np.float32),
             "segment_ids": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T, dtype=np.int32),
                                                                                    (B, T)).copy()}
    batch_sh = {k: sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, v.shape) for k, v in batch.items()}
    device_batch = jax.device_put(batch, batch_sh)

    def apply_fn(p, tokens, positions, segment_ids):
        return model.apply({"params": p}, tokens, positions, segment_ids)

    step = train.jit_train_step(train.make_train_step(apply_fn, next_token, optimizer), state_sh, batch_sh, mesh,
                                sharding.DEFAULT_RULES)
    holder = {"state": jax.jit(lambda p: train.init_state(p, optimizer), out_shardings=state_sh)(params)}
    del params
    losses = []

    def run():
        holder["state"], m = step(holder["state"], device_batch)
        losses.append(float(m["loss"]))  # blocks until the step is done

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    times = _timed(run, args.steps, warmup=1)
    t = statistics.median(times)
    flops = cfg.train_flops_per_token(T) * B * T
    stats = jax.devices()[0].memory_stats() or {}
    return {"part": "train", "impl": "llama_jax", "attention": args.attention, "mask": args.mask, "remat": args.remat,
            "layers": args.layers, "batch": B, "seq": T, "params": cfg.num_params(), "step_s": t,
            "step_s_min": min(times), "tokens_per_s": B * T / t, "tflops": flops / t / 1e12,
            "mfu_spec": flops / t / peak, "peak_flops": peak, "device": kind, "jax": jax.__version__,
            "first_step_s": compile_s, "loss_first": losses[0],
            "loss_last": losses[-1], "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def part_hf_train(args) -> dict:
    import torch
    import transformers

    kind = _require_gpu("torch")
    peak = _spec_peak(args, kind)
    with torch.device(TORCH_DEVICE):
        model = transformers.LlamaForCausalLM(_hf_config(args.layers))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)
    B, T = args.batch, args.seq
    ids = torch.randint(3, SHAPE["vocab_size"], (B, T), device=TORCH_DEVICE)
    losses = []

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))  # synchronises

    times = _timed(run, args.steps)
    t = statistics.median(times)
    from llama_jax.model import LlamaConfig

    flops = LlamaConfig(**SHAPE, n_layers=args.layers, ffn_hidden_dim=FFN).train_flops_per_token(T) * B * T
    return {"part": "train", "impl": "hf_autocast_bf16", "attention": "sdpa", "remat": "none", "layers": args.layers,
            "batch": B, "seq": T, "step_s": t, "step_s_min": min(times), "tokens_per_s": B * T / t,
            "tflops": flops / t / 1e12, "mfu_spec": flops / t / peak, "peak_flops": peak, "device": kind,
            "loss_last": losses[-1],
            "peak_mem_gb": 0 if SMOKE else torch.cuda.max_memory_allocated() / 1e9, "torch": torch.__version__,
            "transformers": transformers.__version__}


def part_decode(args) -> dict:
    """The full 7B in bfloat16 (weights and compute), both sides; new tokens per second."""
    import jax
    import numpy as np

    kind = _require_gpu("torch" if args.impl == "hf" else "jax")
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, SHAPE["vocab_size"], (b, 32)) for b in (1, 16)}
    new = 128
    out = {"part": "decode", "impl": args.impl, "decode_layers": args.decode_layers, "layers": 2 if SMOKE else 32,
           "new_tokens": new, "prompt": 32, "device": kind}
    if args.impl == "llama_jax":
        from llama_jax import sharding
        from llama_jax.generate import generate
        from llama_jax.model import Llama, LlamaConfig

        cfg = LlamaConfig(**{**SHAPE, "max_seq_len": 256}, n_layers=2 if SMOKE else 32, dtype="bfloat16",
                          param_dtype="bfloat16", decode_layers=args.decode_layers)
        params, _ = sharding.init_params(Llama(cfg), jax.random.key(0), sharding.make_mesh(1, 1, 1, jax.devices()[:1]),
                                         sharding.DEFAULT_RULES)
        out["param_bytes"] = cfg.num_params() * 2
        for b, p in prompts.items():
            def fn(p=p):
                gen = generate(cfg, params, p.tolist(), new, eos_id=-1)
                assert all(len(t) == new for t in gen.tokens)
            out[f"batch{b}_tokens_per_s"] = b * new / statistics.median(_timed(fn, args.repeats, 1))
    else:
        import torch
        import transformers

        with torch.device(TORCH_DEVICE):
            model = transformers.LlamaForCausalLM(_hf_config(2 if SMOKE else 32)).to(torch.bfloat16).eval()
        for b, p in prompts.items():
            ids = torch.tensor(p, device=TORCH_DEVICE)

            def fn(ids=ids):
                with torch.no_grad():
                    o = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                       pad_token_id=0)
                if not SMOKE:
                    torch.cuda.synchronize()
                assert o.shape[1] == 32 + new
            out[f"batch{b}_tokens_per_s"] = b * new / statistics.median(_timed(fn, args.repeats, 1))
    return out


PARTS = {"peak": part_peak, "check": part_check, "train": part_train, "hf_train": part_hf_train,
         "decode": part_decode}


# ------------------------------------------------------------------------ driver ---

def plan(args) -> list[tuple[list[str], dict]]:
    """(arguments, extra environment) of each run, in order of importance."""
    L, S = f"--layers={args.layers}", f"--steps={args.steps}"
    runs = [(["--part=peak"], {}), (["--part=check"], {})]
    for attention, batch in (("cudnn", 4), ("xla", 2)):
        runs.append((["--part=train", f"--attention={attention}", f"--batch={batch}", "--seq=4096", "--remat=none",
                      L, S], {}))
    runs.append((["--part=train", "--attention=cudnn", "--mask=causal", "--batch=4", "--seq=4096", "--remat=none", L,
                  S], {}))
    runs.append((["--part=hf_train", "--batch=4", "--seq=4096", L, S], {}))
    R = f"--repeats={args.repeats}"
    runs.append((["--part=decode", "--impl=llama_jax", R], {}))
    runs.append((["--part=decode", "--impl=hf", R], {}))
    runs.append((["--part=train", "--attention=cudnn", "--batch=8", "--seq=4096", "--remat=none", L, S], {}))
    runs.append((["--part=decode", "--impl=llama_jax", "--decode_layers=stacked", R], {}))
    runs.append((["--part=train", "--attention=cudnn", "--batch=2", "--seq=4096", "--remat=none", L, S], {}))
    runs.append((["--part=train", "--attention=cudnn", "--batch=4", "--seq=4096", "--remat=none", L, S],
                 {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}))
    return runs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except None ones (their help says what none means). A copy of
    llama_jax.cli.DefaultsHelp: the driver itself runs without the package importable (its
    runs get the repository on PYTHONPATH)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False,  # --bat=8 would pass the per-run flag check
                                 description=__doc__.split("\n\n")[0], formatter_class=_Help)
    ap.add_argument("--part", choices=sorted(PARTS), default=None, help="run one part (the driver runs them all)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the 7B-shaped model trained")
    ap.add_argument("--steps", type=int, default=10, help="timed train steps (their median)")
    ap.add_argument("--batch", type=int, default=4, help="rows a train step (one run)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens a row (one run)")
    ap.add_argument("--attention", default="cudnn", choices=("xla", "cudnn"), help="attention kernel (one run)")
    ap.add_argument("--remat", default="none", help="the model's remat policy (one run)")
    ap.add_argument("--mask", default="segments", choices=("segments", "causal"),
                    help="causal: cuDNN attention without the segment mask (exact for these unpacked rows)")
    ap.add_argument("--impl", default="llama_jax", choices=("llama_jax", "hf"), help="decode side (one run)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode runs (their median)")
    ap.add_argument("--decode_layers", default="auto", choices=("auto", "stacked", "layerwise"),
                    help="llama_jax's decode loop over layers (one run)")
    ap.add_argument("--out", default=None, help="append each result as a JSON line here")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds; later runs are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, xla attention: try the script on a CPU")
    ap.add_argument("--run_timeout", type=float, default=180.0, help="seconds one run may take")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="the dense bfloat16 peak MFU is a fraction of (0: the device's datasheet value)")
    args = ap.parse_args(argv)
    for name in ("layers", "steps", "batch", "seq", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seq > SHAPE["max_seq_len"]:
        ap.error(f"--seq {args.seq} exceeds the model's context {SHAPE['max_seq_len']}")
    one_run = ("batch", "seq", "attention", "remat", "mask", "impl", "decode_layers")
    raw = sys.argv[1:] if argv is None else argv
    set_here = [n for n in one_run if any(a == f"--{n}" or a.startswith(f"--{n}=") for a in raw)]
    if not args.part and set_here:  # the driver's runs set their own
        ap.error(f"--{set_here[0]} is for one run (--part=NAME); the driver's runs choose their own")
    if args.part:
        try:
            _emit(args.out, PARTS[args.part](args))
        except Exception as e:  # one line the driver can read, then the traceback
            _emit(args.out, {"part": args.part, "error": f"{type(e).__name__}: {str(e)[:500]}", "argv": sys.argv[1:]})
            raise
        return 0

    start = time.time()
    os.environ.setdefault("GPU_MFU_RUN_ID", time.strftime("%Y%m%dT%H%M%S"))  # one id on every row of this invocation
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # importable without installing
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    for run_args, extra in plan(args):
        left = args.deadline - (time.time() - start)
        if left < 30:
            _emit(args.out, {"skipped": run_args, "why": "deadline"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *run_args] + ([f"--out={args.out}"] if args.out else []) \
            + ([f"--peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])
        if SMOKE:
            cmd = [c.replace("--attention=cudnn", "--attention=xla").replace("--layers=32", "--layers=2")
                   .replace("--seq=4096", "--seq=64")
                   for c in cmd] + ["--smoke"]
        shown = cmd[2:len(cmd) - (1 if SMOKE else 0)]  # what runs (--smoke's shapes), less the script and --smoke
        print(f"== {' '.join(shown)} {extra or ''} (t={time.time() - start:.0f} s)", flush=True)
        try:
            code = subprocess.run(cmd, env={**env, **extra}, timeout=min(args.run_timeout, left)).returncode
        except subprocess.TimeoutExpired:
            _emit(args.out, {"timeout": run_args, "seconds": min(args.run_timeout, left)})
            continue
        if code:  # a run killed by a signal (the OOM killer) writes no row of its own
            _emit(args.out, {"failed": run_args, "returncode": code})
        if code == NO_GPU:
            return NO_GPU
    return 0


if __name__ == "__main__":
    sys.exit(main())
