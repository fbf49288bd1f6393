"""Decode throughput: llama_jax `generate` against Hugging Face `generate`, same model.

    python benchmarks/decode_throughput.py [--repeats=5] [--new_tokens=128] [--prompt_len=32]

Reference config (issue 9): dim 512, 8 layers, 8 heads, FFN by Meta's formula (1536),
vocab 32000; prompt 32 tokens, 128 new tokens (EOS disabled so every run decodes all
128), greedy, batch 1 and batch 16. Both run float32 on the CPU in this one process, with
identical weights (ours exported to HF). Compilation / warm-up runs are excluded; the
two sides' timed runs alternate (so a busy machine slows both alike) and the median of
`--repeats` runs each is reported as new tokens per second. llama_jax runs its defaults
(on a CPU: `decode_layers="auto"` = layerwise).

The last two columns bound what any implementation can reach here: the tokens/s of a
decode step that did nothing but its weight matmuls ([batch, in] @ [in, out] for every
weight matrix, float32, the faster of NumPy's BLAS and XLA), and that bound over HF's
rate. A target ratio above "bound / HF" cannot be met on this machine in float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time


def weight_matrices(params) -> list:
    """Every weight matrix a decode step multiplies by, as 2-D float32 [in, out] NumPy
    arrays (per layer, then the output head); norms and the embedding gather are left out."""
    import numpy as np

    mats = []
    for name in ("attention/wq", "attention/wk", "attention/wv", "attention/wo", "feed_forward/w1",
                 "feed_forward/w3", "feed_forward/w2"):
        group, leaf = name.split("/")
        stacked = np.asarray(params["layers"][group][leaf], np.float32)
        for w in stacked:  # [n_layers, ...]
            mats.append(w.reshape(-1, w.shape[-1]) if leaf == "wo" else w.reshape(w.shape[0], -1))
    mats.append(np.asarray(params["output"], np.float32))
    return mats


def matmul_floor(mats, batch: int, repeats: int = 20) -> float:
    """Seconds per decode step spent in its weight matmuls alone ([batch, in] @ [in, out]
    for every matrix), the faster of NumPy's BLAS and one XLA program: no decode step on
    this machine can take less (at batch 1 it is the time to read the weights)."""
    import jax
    import numpy as np

    xs = [np.random.default_rng(0).standard_normal((batch, w.shape[0]), np.float32) for w in mats]

    def blas():
        return [x @ w for x, w in zip(xs, mats)]

    xla_fn = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws)])
    xs_d, mats_d = jax.device_put(xs), jax.device_put(mats)

    def xla():
        return jax.block_until_ready(xla_fn(xs_d, mats_d))

    best = float("inf")
    for fn in (blas, xla):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main(argv=None) -> int:
    from llama_jax.cli import DefaultsHelp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelp)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each side at each batch (their median)")
    ap.add_argument("--new_tokens", type=int, default=128, help="tokens each run decodes (EOS disabled)")
    ap.add_argument("--prompt_len", type=int, default=32,
                    help="prompt tokens; a multiple of 16, the length llama_jax pads prompts to")
    args = ap.parse_args(argv)
    if min(args.repeats, args.new_tokens, args.prompt_len) < 1 or args.prompt_len + args.new_tokens > 512:
        ap.error("--repeats, --new_tokens and --prompt_len must be >= 1, and prompt + new tokens at most 512 (the "
                 f"model's context); got {args.repeats}, {args.new_tokens}, {args.prompt_len}")
    if args.prompt_len % 16:  # else llama_jax would prefill a longer (padded) prompt than HF
        ap.error(f"--prompt_len {args.prompt_len}: use a multiple of 16, the length llama_jax pads prompts to, so "
                 "that both sides prefill the same number of tokens")

    import jax
    import numpy as np
    import torch
    import transformers

    from llama_jax import convert, metrics, sharding
    from llama_jax.generate import generate
    from llama_jax.model import Llama, LlamaConfig

    cfg = LlamaConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=512)
    params, _ = sharding.init_params(Llama(cfg), jax.random.key(0), sharding.make_mesh(1, 1, 1, jax.devices()[:1]),
                                     sharding.DEFAULT_RULES)
    with tempfile.TemporaryDirectory() as d:
        convert.to_hf(params, cfg, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()

    rng = np.random.default_rng(0)
    print("command: python benchmarks/decode_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {metrics.cpu_description()}; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"config: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.hidden_dim}, vocab "
          f"{cfg.vocab_size}; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, float32")
    mats = weight_matrices(params)
    print(f"{'batch':>5} {'llama_jax tok/s':>16} {'HF generate tok/s':>18} {'ratio':>7} {'matmul-bound tok/s':>19} "
          f"{'bound / HF':>10}")
    for batch in (1, 16):
        prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len))

        def ours():
            out = generate(cfg, params, prompts.tolist(), args.new_tokens, eos_id=-1)
            assert all(len(t) == args.new_tokens for t in out.tokens)

        def theirs():
            with torch.no_grad():
                out = hf.generate(torch.tensor(prompts), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
            assert out.shape[1] == args.prompt_len + args.new_tokens

        runs = (("ours", ours), ("hf", theirs))
        for _, fn in runs:
            fn()  # warm-up (compilation for ours)
        times = {name: [] for name, _ in runs}
        for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
            for name, fn in runs:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        rates = {name: batch * args.new_tokens / statistics.median(ts) for name, ts in times.items()}
        bound = batch / matmul_floor(mats, batch)  # tokens/s if a step were its weight matmuls and nothing else
        print(f"{batch:>5} {rates['ours']:>16,.0f} {rates['hf']:>18,.0f} {rates['ours'] / rates['hf']:>6.2f}x "
              f"{bound:>19,.0f} {bound / rates['hf']:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
