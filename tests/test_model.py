import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import random_params, run

from llama_jax.convert import permute_rotary, unpermute_rotary
from llama_jax.model import KVCache, Llama, LlamaConfig, param_count
from llama_jax.sharding import abstract_params

# Odd, prime-ish sizes so that a transposed or mis-reshaped axis cannot go unnoticed.
ODD = dict(dim=42, n_layers=3, n_heads=7, n_kv_heads=1, vocab_size=97, ffn_hidden_dim=59, max_seq_len=64)
GQA = dict(dim=60, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=89, ffn_hidden_dim=71, max_seq_len=64)


def init(cfg, heads=("lm",), seed=0):
    return random_params(cfg, heads, seed)


def tokens(cfg, b, t, seed=2):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


# ------------------------------------------------------------------------- presets ---

@pytest.mark.parametrize("name,count,ffn", [
    ("7b", 6_738_415_616, 11008),
    ("13b", 13_015_864_320, 13824),
    ("34b", 33_743_970_304, 22016),
    ("70b", 68_976_648_192, 28672),
])
def test_preset_parameter_counts_exact(name, count, ffn):
    cfg = LlamaConfig.preset(name)
    assert cfg.hidden_dim == ffn
    shapes = abstract_params(Llama(cfg))  # eval_shape: no memory
    assert param_count(shapes) == count
    assert cfg.num_params() == count
    assert shapes["layers"]["attention"]["wk"].shape == (cfg.n_layers, cfg.dim, cfg.kv_heads, 128)


def test_explicit_ffn_width_overrides_meta_formula():
    assert LlamaConfig.llama2_7b(ffn_hidden_dim=11001).hidden_dim == 11001
    shapes = abstract_params(Llama(LlamaConfig(**ODD)))
    assert shapes["layers"]["feed_forward"]["w1"].shape == (3, 42, 59)


def test_train_flops_per_token_by_hand():
    """MFU's numerator: 6 N_matmul + 6 L T H Dh (causal; 12 without the mask), N_matmul
    the weights of every matmul a token passes through (q, k, v, o, the MLP's three, the
    output head; not the embedding lookup, not the norms)."""
    # Llama 2 7B: d 4096, 32 layers, 32 heads of 128, FFN 11008, vocab 32000
    d, L, H, Dh, f, V, T = 4096, 32, 32, 128, 11008, 32000, 4096
    n_matmul = L * (4 * d * d + 3 * d * f) + d * V
    assert n_matmul == 6_607_077_376 == 6_738_415_616 - V * d - (2 * L + 1) * d  # all params less lookup and norms
    cfg = LlamaConfig.preset("7b")
    assert cfg.matmul_params() == n_matmul
    assert cfg.train_flops_per_token(T) == 6 * n_matmul + 6 * L * T * H * Dh == 42_863_689_728
    assert cfg.train_flops_per_token(T, causal=False) == 6 * n_matmul + 12 * L * T * H * Dh
    # a tiny GQA model: k and v have 2 heads of 10, q and o 6
    tiny = LlamaConfig(**GQA)  # dim 60, 2 layers, vocab 89, FFN 71
    per_layer = 60 * 60 + 2 * (60 * 20) + 60 * 60 + 3 * 60 * 71  # wq, wk + wv, wo, w1 w2 w3
    assert tiny.matmul_params() == 2 * per_layer + 60 * 89 == 50_100
    assert tiny.train_flops_per_token(16) == 6 * 50_100 + 6 * 2 * 16 * 6 * 10 == 312_120
    assert tiny.train_flops_per_token(16, causal=False) == 323_640
    # a stage's own heads: a reward model's score head is dim x 1, not the LM head's dim x vocab; PPO's value
    # head adds one; DPO's step also runs the frozen reference's forward pass (a third of a train step's)
    assert tiny.matmul_params(("score",)) == 2 * per_layer + 60
    assert tiny.matmul_params(("lm", "value")) == 50_100 + 60
    from llama_jax.stages import STAGES

    assert STAGES["reward_model"]().flops_per_token(tiny, 16) == 6 * (2 * per_layer + 60) + 6 * 2 * 16 * 6 * 10
    assert STAGES["dpo"]().flops_per_token(tiny, 16) == 312_120 * 4 / 3
    assert STAGES["sft"]().flops_per_token(tiny, 16) == 312_120


@pytest.mark.parametrize("kw,needle", [
    (dict(dim=64, n_heads=6), "dim=64 is not divisible by n_heads=6"),
    (dict(dim=64, n_heads=8, n_kv_heads=3), "n_heads=8 is not divisible by n_kv_heads=3"),
    (dict(dim=56, n_heads=8), "head_dim = dim/n_heads = 7 must be even"),
    (dict(dtype="fp8"), "LlamaConfig.dtype: 'fp8' is not one of"),
    (dict(remat_policy="some"), "LlamaConfig.remat_policy"),
    (dict(n_layers=0), "LlamaConfig.n_layers: must be a positive integer"),
    (dict(mlp_backward="fast"), "LlamaConfig.mlp_backward: 'fast' is not one of"),
    (dict(head_backward="yes"), "LlamaConfig.head_backward: 'yes' is not one of"),
    (dict(attention="flash"), "LlamaConfig.attention: 'flash' is not one of"),
    (dict(ffn_dim_multiplier=0.0), "LlamaConfig.ffn_dim_multiplier: must be a finite number > 0 or None, got 0.0"),
    (dict(ffn_dim_multiplier="1.3"), "LlamaConfig.ffn_dim_multiplier: must be a finite number > 0 or None"),
    (dict(ffn_dim_multiplier=1e-9), "LlamaConfig.ffn_dim_multiplier: 1e-09 gives an FFN width of 0"),
    (dict(norm_eps="1e-5"), "LlamaConfig.norm_eps: must be a finite number > 0, got '1e-5'"),
    (dict(norm_eps=float("inf")), "LlamaConfig.norm_eps: must be a finite number > 0, got inf"),
    (dict(rope_theta=float("nan")), "LlamaConfig.rope_theta: must be a finite number > 0, got nan"),
    (dict(scan_layers="false"), "LlamaConfig.scan_layers: must be true or false, got 'false'"),
    (dict(n_kv_heads=True), "LlamaConfig.n_kv_heads: must be a positive integer or None, got True"),
    (dict(ffn_hidden_dim=True), "LlamaConfig.ffn_hidden_dim: must be a positive integer or None, got True"),
])
def test_config_errors_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("/", "/")):
        LlamaConfig(**kw)


def test_config_round_trips_through_dict():
    cfg = LlamaConfig.llama2_70b(dtype="bfloat16")
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LlamaConfig fields \\['n_experts'\\]"):
        LlamaConfig.from_dict({**cfg.to_dict(), "n_experts": 8})


# --------------------------------------------------- against a frozen reference ---

def to_meta(params, cfg):
    """llama_jax params -> Meta state dict (float64), wq/wk rows in Meta's RoPE order."""
    D, H, K, Dh = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    lay = p["layers"]
    meta = {"tok_embeddings.weight": p["tok_embeddings"]["embedding"], "norm.weight": p["norm"]["scale"],
            "output.weight": p["output"].T}
    for i in range(cfg.n_layers):
        a, f = lay["attention"], lay["feed_forward"]
        meta.update({
            f"layers.{i}.attention_norm.weight": lay["attention_norm"]["scale"][i],
            f"layers.{i}.ffn_norm.weight": lay["ffn_norm"]["scale"][i],
            f"layers.{i}.attention.wq.weight": unpermute_rotary(a["wq"][i].reshape(D, H * Dh).T, H),
            f"layers.{i}.attention.wk.weight": unpermute_rotary(a["wk"][i].reshape(D, K * Dh).T, K),
            f"layers.{i}.attention.wv.weight": a["wv"][i].reshape(D, K * Dh).T,
            f"layers.{i}.attention.wo.weight": a["wo"][i].reshape(H * Dh, D).T,
            f"layers.{i}.feed_forward.w1.weight": f["w1"][i].T,
            f"layers.{i}.feed_forward.w2.weight": f["w2"][i].T,
            f"layers.{i}.feed_forward.w3.weight": f["w3"][i].T,
        })
    return meta


@pytest.mark.parametrize("shape", [ODD, GQA])
def test_forward_matches_meta_reference(shape):
    """GQA mapping (query head j reads kv head j // n_rep), interleaved-vs-rotate-half RoPE
    and the rotary permutation, RMSNorm, SwiGLU: all against an independent float64 port."""
    cfg = LlamaConfig(**shape, rope_theta=500.0)  # small theta: positions matter more
    params = random_params(cfg, std=0.15)  # large weights: sharp attention, every path matters
    toks = tokens(cfg, 1, 13)
    ours = np.asarray(run(Llama(cfg), params, toks))[0]
    ref = reference.forward(to_meta(params, cfg), cfg.n_layers, cfg.n_heads, cfg.kv_heads,
                            cfg.norm_eps, cfg.rope_theta, np.asarray(toks[0]))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
    assert np.abs(ref).max() > 0.1  # not a trivially small output


def test_rotary_permutation_round_trips():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    assert not np.array_equal(permute_rotary(w, 6), w)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 6), 6), w)
    # Within a head of Dh=8, Meta's rows (0,1),(2,3).. become rows (0,4),(1,5)..
    np.testing.assert_array_equal(permute_rotary(w, 6)[:8, 0], w[[0, 2, 4, 6, 1, 3, 5, 7], 0])


# --------------------------------------------------------------------- KV cache ---

@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_equals_full_forward(scan_layers):
    cfg = LlamaConfig(**GQA, scan_layers=scan_layers)
    params = init(cfg)
    model = Llama(cfg)
    toks = tokens(cfg, 3, 12)
    full = run(model, params, toks)

    prefill = jax.jit(lambda p, t, c: run(model, p, t, cache=c))
    cache = KVCache.init(cfg, batch_size=3, max_len=16)
    logits, cache = prefill(params, toks[:, :5], cache)
    steps = [logits]
    for i in range(5, 12):  # one-token decode steps
        logits, cache = prefill(params, toks[:, i:i + 1], cache)
        steps.append(logits)
    assert int(cache.index) == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    assert cache.k.shape == (cfg.n_layers, 3, cfg.kv_heads, 16, cfg.head_dim)


def test_left_padded_batch_decodes_like_unpadded_rows():
    """Prompts of different lengths in one batch: left padding (segment 0) is invisible."""
    cfg = LlamaConfig(**ODD)
    params = init(cfg)
    model = Llama(cfg)
    short, long_ = tokens(cfg, 1, 4, seed=3)[0], tokens(cfg, 1, 7, seed=4)[0]
    pad = 3
    batch = jnp.stack([jnp.concatenate([jnp.zeros(pad, jnp.int32), short]), long_])
    seg = jnp.array([[0] * pad + [1] * 4, [1] * 7])
    pos = jnp.array([[0] * pad + list(range(4)), list(range(7))])
    cache = KVCache.init(cfg, 2, 10)
    logits, cache = run(model, params, batch, pos, seg, cache=cache)
    nxt = jnp.array([[5], [6]])
    step, cache = run(model, params, nxt, pos[:, -1:] + 1, jnp.ones((2, 1), jnp.int32), cache=cache)

    for row, seq in ((0, short), (1, long_)):
        alone = run(model, params, jnp.concatenate([seq, nxt[row]])[None])[0]
        np.testing.assert_allclose(logits[row, -1], alone[-2], atol=1e-5)
        np.testing.assert_allclose(step[row, 0], alone[-1], atol=1e-5)


def test_segment_ids_isolate_packed_sequences():
    cfg = LlamaConfig(**GQA)
    params = init(cfg)
    model = Llama(cfg)
    a, b = tokens(cfg, 1, 5, seed=5)[0], tokens(cfg, 1, 6, seed=6)[0]
    packed = jnp.concatenate([a, b])[None]
    seg = jnp.array([[1] * 5 + [2] * 6])
    pos = jnp.array([list(range(5)) + list(range(6))])
    out = run(model, params, packed, pos, seg)[0]
    np.testing.assert_allclose(out[:5], run(model, params, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(out[5:], run(model, params, b[None])[0], atol=1e-5)
    # Without segment ids the second sequence does see the first.
    mixed = run(model, params, packed, pos)[0]
    assert np.abs(mixed[5:] - out[5:]).max() > 1e-3


# ------------------------------------------------------------------------ heads ---

def test_score_head_reads_last_real_token_of_right_padded_rows():
    cfg = LlamaConfig(**GQA)
    params = init(cfg, heads=("score",))
    assert "output" not in params and params["score_head"]["kernel"].shape == (cfg.dim, 1)
    rm = Llama(cfg, ("score",))
    a, b = tokens(cfg, 1, 4, seed=7)[0], tokens(cfg, 1, 7, seed=8)[0]
    batch = jnp.stack([jnp.concatenate([a, jnp.zeros(3, jnp.int32)]), b])
    seg = jnp.array([[1] * 4 + [0] * 3, [1] * 7])
    scores = run(rm, params, batch, segment_ids=seg)
    assert scores.shape == (2,)
    np.testing.assert_allclose(scores[0], run(rm, params, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(scores[1], run(rm, params, b[None])[0], atol=1e-5)
    # Reading the padded position instead would give a different number.
    assert abs(float(scores[0]) - float(run(rm, params, batch[:1])[0])) > 1e-4


def test_mean_pooled_score_is_the_mean_of_per_token_scores_over_the_answer():
    # A causal trunk's state at position t is the last-token state of the prefix [0..t], so
    # mean pooling over the answer equals the mean of last-token scores of its prefixes.
    last_cfg = LlamaConfig(**GQA)
    mean_cfg = LlamaConfig(**GQA, score_pooling="mean")
    params = init(last_cfg, heads=("score",))
    last, mean = Llama(last_cfg, ("score",)), Llama(mean_cfg, ("score",))
    row = tokens(last_cfg, 1, 6, seed=9)[0]
    batch = jnp.stack([row, jnp.concatenate([row[:4], jnp.zeros(2, jnp.int32)])])
    seg = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    answer = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]], jnp.float32)  # row 1: padding masked out
    got = run(mean, params, batch, None, seg, score_mask=answer)
    prefix = [float(run(last, params, row[None, :t + 1])[0]) for t in range(6)]
    np.testing.assert_allclose(got, [np.mean(prefix[3:6]), np.mean(prefix[2:4])], atol=1e-5)
    assert abs(float(got[0]) - prefix[5]) > 1e-4  # not the last token's score
    with pytest.raises(ValueError, match="score_mask"):
        run(mean, params, batch, None, seg)
    with pytest.raises(ValueError, match="score_pooling"):
        LlamaConfig(**GQA, score_pooling="max")


def test_lm_and_value_heads_share_the_trunk():
    cfg = LlamaConfig(**ODD)
    both = init(cfg, heads=("lm", "value"))
    out = run(Llama(cfg, ("lm", "value")), both, tokens(cfg, 2, 5))
    assert out["lm"].shape == (2, 5, cfg.vocab_size) and out["value"].shape == (2, 5)
    lm_only = {k: v for k, v in both.items() if k != "value_head"}
    np.testing.assert_allclose(run(Llama(cfg), lm_only, tokens(cfg, 2, 5)), out["lm"], atol=1e-6)
    assert cfg.num_params(("lm", "value")) == param_count(both)
    with pytest.raises(ValueError, match="unknown head 'policy'"):
        init(cfg, heads=("policy",))


@pytest.mark.parametrize("detach", [False, True])
def test_a_detached_value_head_trains_the_head_alone(detach):
    # PPO's ppo.detach_value: the critic's loss must not move the policy's trunk
    cfg = LlamaConfig(**ODD)
    params, t = init(cfg, heads=("lm", "value")), tokens(cfg, 2, 5)
    model = Llama(cfg, ("lm", "value"), detach_value=detach)

    def value_loss(p):
        return jnp.sum(model.apply({"params": p}, t)["value"] ** 2)

    grads = jax.grad(value_loss)(params)
    trunk = max(float(jnp.abs(g).max()) for k, g in jax.tree_util.tree_leaves_with_path(grads)
                if "value_head" not in jax.tree_util.keystr(k))
    assert float(jnp.abs(grads["value_head"]["kernel"]).max()) > 0
    assert (trunk == 0.0) if detach else (trunk > 0.0)
    same = Llama(cfg, ("lm", "value")).apply({"params": params}, t)  # the forward pass is unchanged
    np.testing.assert_array_equal(model.apply({"params": params}, t)["value"], same["value"])


# -------------------------------------------------------------------- numerics ---

def loss_and_grads(cfg, params, toks):
    """(mean squared logit, its gradient) of the model `cfg` at `params`."""
    def loss(p):
        return jnp.mean(run(Llama(cfg), p, toks) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_give_identical_gradients():
    base = LlamaConfig(**GQA)
    params = init(base)
    toks = tokens(base, 2, 9)

    def grads(cfg):
        return loss_and_grads(cfg, params, toks)[1]

    ref = grads(base)
    for policy, scan in (("full", True), ("dots", False)):
        g = grads(base.replace(remat_policy=policy, scan_layers=scan))
        for x, y in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def _assert_same_gradients(base, params, toks, field):
    """`field`="manual" (a hand-written VJP) against "xla" (JAX's autodiff of the same
    forward), through the whole model, in float32 and bfloat16 compute."""
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        lx, gx = loss_and_grads(base.replace(**{field: "xla"}, dtype=dtype), params, toks)
        lm, gm = loss_and_grads(base.replace(**{field: "manual"}, dtype=dtype), params, toks)
        assert float(lx) == float(lm)  # the same forward
        flat_x, flat_m = jax.tree_util.tree_leaves_with_path(gx), jax.tree_util.tree_leaves(gm)
        for (path, x), y in zip(flat_x, flat_m):
            scale = float(jnp.abs(x).max())
            assert scale > 0, path
            np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(x, np.float32), atol=tol * scale,
                                       rtol=tol, err_msg=str(path))


def test_manual_mlp_backward_gives_autodiffs_gradients():
    """swiglu_mlp's hand-written VJP against JAX's autodiff (every weight, the embeddings'
    gradient flowing through the MLPs); and which one the default and "auto" pick."""
    from llama_jax.model import manual_mlp_backward

    base = LlamaConfig(**GQA)
    params = init(base)
    toks = tokens(base, 2, 9)
    _assert_same_gradients(base, params, toks, "mlp_backward")
    assert manual_mlp_backward(base)  # the default, "auto": the tests run on CPU, without remat
    assert not manual_mlp_backward(base.replace(mlp_backward="xla"))
    assert not manual_mlp_backward(base.replace(mlp_backward="auto", remat_policy="full"))
    assert manual_mlp_backward(base.replace(mlp_backward="manual", remat_policy="dots"))
    _, remat = loss_and_grads(base.replace(mlp_backward="manual", remat_policy="full"), params, toks)
    _, ref = loss_and_grads(base.replace(mlp_backward="xla"), params, toks)
    for x, y in zip(jax.tree_util.tree_leaves(remat), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def test_manual_head_backward_gives_autodiffs_gradients():
    """head_logits' hand-written VJP (the output head: its weight's gradient, and the
    gradient of every weight below it) against autodiff, alone and with the MLP's; and
    which one the default and "auto" pick."""
    from llama_jax.model import head_logits, manual_head_backward

    base = LlamaConfig(**GQA)
    params = init(base)
    toks = tokens(base, 2, 9)
    _assert_same_gradients(base, params, toks, "head_backward")  # with the MLP's VJP (the CPU default)
    _assert_same_gradients(base.replace(mlp_backward="xla"), params, toks, "head_backward")
    assert manual_head_backward(base)  # the default, "auto": the tests run on CPU
    assert not manual_head_backward(base.replace(head_backward="xla"))
    x = jax.random.normal(jax.random.key(1), (2, 3, 5))
    w = jax.random.normal(jax.random.key(2), (5, 7))
    g = jax.random.normal(jax.random.key(3), (2, 3, 7))
    _, vjp = jax.vjp(head_logits, x, w)
    dx, dw = vjp(g)
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.reshape(6, 5).T @ g.reshape(6, 7), rtol=1e-5, atol=1e-5)


def _assert_kernel_matches_einsums(kernel, length, after_einsums=lambda: None):
    """attention=`kernel` against the einsum path on two GQA rows of `length` tokens (two
    packed segments; one segment right-padded by 3): logits at real positions, the loss
    and every gradient. `after_einsums` runs between the two (to check what ran)."""
    base = LlamaConfig(**{**GQA, "max_seq_len": 512})
    params = init(base)
    toks = tokens(base, 2, length)
    a = length // 2
    seg = jnp.array([[1] * a + [2] * (length - a), [1] * (length - 3) + [0] * 3])
    pos = jnp.array([list(range(a)) + list(range(length - a)), list(range(length - 3)) + [0] * 3])
    real_rows = np.asarray(seg != 0)

    def loss(cfg, p):
        logits = run(Llama(cfg), p, toks, pos, seg)
        return jnp.sum(jnp.where(real_rows[..., None], logits, 0.0) ** 2), logits

    (l_x, out_x), g_x = jax.value_and_grad(lambda p: loss(base, p), has_aux=True)(params)
    after_einsums()
    (l_k, out_k), g_k = jax.value_and_grad(lambda p: loss(base.replace(attention=kernel), p), has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(out_k)[real_rows], np.asarray(out_x)[real_rows], atol=2e-5)
    np.testing.assert_allclose(float(l_k), float(l_x), rtol=1e-5)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_x), jax.tree_util.tree_leaves(g_k)):
        np.testing.assert_allclose(y, x, atol=1e-5 * float(jnp.abs(x).max()), rtol=1e-4, err_msg=str(path))


def test_fused_attention_path_matches_the_einsums_on_packed_padded_gqa_rows(monkeypatch):
    """attention="cudnn" calls jax.nn.dot_product_attention (causal, segment mask, GQA
    layout). cuDNN needs a GPU, so here the same call runs with JAX's XLA kernel: what is
    checked is our wiring (mask, scale, head grouping, layout), against the einsum path,
    forward and gradients, on packed segments with right padding; and which path "auto"
    picks (cuDNN only on a GPU with bfloat16/float16 compute)."""
    from llama_jax.model import attention_kernel, check_attention_kernel

    calls = []
    real = jax.nn.dot_product_attention

    def on_cpu(*args, implementation=None, **kw):
        calls.append(implementation)
        return real(*args, implementation="xla", **kw)

    def none_yet():
        assert calls == []

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    _assert_kernel_matches_einsums("cudnn", 9, after_einsums=none_yet)
    assert calls and set(calls) == {"cudnn"}
    base = LlamaConfig(**GQA)
    assert attention_kernel(base.replace(attention="auto", dtype="bfloat16")) == "xla"  # CPU: the einsums
    assert attention_kernel(base.replace(attention="cudnn")) == "cudnn"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what "auto" would pick on a GPU
    kernel_shape = dict(dim=64, n_heads=2, n_kv_heads=1)
    assert attention_kernel(base.replace(attention="auto", dtype="bfloat16", **kernel_shape)) == "cudnn"
    assert attention_kernel(base.replace(attention="auto", dtype="float32", **kernel_shape)) == "xla"
    assert attention_kernel(base.replace(attention="auto", dtype="bfloat16")) == "xla"  # head dim 10: not a kernel
    with pytest.raises(ValueError, match="'splash' is the TPU's Pallas kernel; on a GPU use 'cudnn'"):
        attention_kernel(base.replace(attention="splash"))
    # what runs and CLIs check before any work (cuDNN's own errors name neither the field nor the fix)
    cudnn = base.replace(attention="cudnn", dtype="bfloat16", **kernel_shape)
    assert check_attention_kernel(cudnn) == "cudnn"
    for cfg, words in ((cudnn.replace(dtype="float32"), "'cudnn' computes in bfloat16 or float16, not dtype='float32'"),
                       (base.replace(attention="cudnn", dtype="bfloat16"), "multiples of 8 up to 128, not 10")):
        with pytest.raises(ValueError, match=words):
            check_attention_kernel(cfg)
    with pytest.raises(ValueError, match="multiples of 8 up to 128, not 256"):
        check_attention_kernel(cudnn.replace(dim=cudnn.n_heads * 256))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(ValueError, match="LlamaConfig.attention: 'cudnn' needs a GPU \\(this backend: cpu\\)"):
        check_attention_kernel(cudnn)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # Splash is opt-in until measured on a TPU
    assert attention_kernel(LlamaConfig.llama2_7b(dtype="bfloat16")) == "xla"


@pytest.mark.parametrize("length", [9, 300])
def test_splash_attention_path_matches_the_einsums_on_packed_padded_gqa_rows(length):
    """attention="splash" runs JAX's Splash kernel (interpreted on a CPU) with the rows'
    segment ids: logits and every gradient equal the einsum path's on packed segments with
    right padding and grouped queries. 9 tokens are padded to one 128-token block; 300 to
    three blocks, so the kernel's causal block skipping and its masked diagonal blocks
    both run."""
    _assert_kernel_matches_einsums("splash", length)


def test_splash_attention_lowers_for_a_tpu_without_a_score_tensor(monkeypatch):
    """With no TPU here, the Splash path is lowered for one (`jax.export`, platforms
    ["tpu"]) on a 1 x 2 x 4 mesh of the 8 fake devices: a 7B-shaped layer with grouped
    queries (8 kv heads) in bfloat16 at 2,048 tokens, forward and gradient. Pallas's TPU
    lowering checks the kernel's block shapes; the program must hold its three Mosaic
    kernels (forward, dq, dk/dv) inside shard_map's manual computations and no
    [2048, 2048] tensor, which the einsum path does hold."""
    from llama_jax import sharding

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # the kernel compiled, not interpreted
    mesh, rules = sharding.make_mesh(1, 2, 4), sharding.DEFAULT_RULES
    toks = jax.ShapeDtypeStruct((2, 2048), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, (2, 2048)))
    found = {}
    for kernel in ("splash", "xla"):
        cfg = LlamaConfig.llama2_7b(dtype="bfloat16", n_kv_heads=8, attention=kernel).replace(n_layers=1)
        model = Llama(cfg)
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params(model))

        def loss(p, toks, seg, model=model):
            return jnp.mean(model.apply({"params": p}, toks, None, seg))

        with sharding.activate(mesh, rules):
            text = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=["tpu"])(params, toks, toks)
            text = text.mlir_module()
        found[kernel] = [text.count(s) for s in ("tpu_custom_call", "2048x2048", "sdy.manual_computation")]
    assert found["splash"][:2] == [3, 0] and found["splash"][2] > 0
    assert found["xla"][0] == found["xla"][2] == 0 and found["xla"][1] > 0

def test_bfloat16_compute_returns_float32_logits_close_to_float32():
    cfg = LlamaConfig(**GQA)
    params = init(cfg)
    toks = tokens(cfg, 2, 8)
    f32 = run(Llama(cfg), params, toks)
    bf16 = run(Llama(cfg.replace(dtype="bfloat16")), params, toks)
    assert bf16.dtype == jnp.float32
    assert 0 < float(jnp.abs(bf16 - f32).max()) < 0.05
    cache = KVCache.init(cfg.replace(dtype="bfloat16"), 1, 4)
    assert cache.k.dtype == jnp.bfloat16
