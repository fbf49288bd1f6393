"""The Llama 2 model: config and presets, RMSNorm, RoPE, GQA attention with an explicit
KV cache, SwiGLU MLP, and the LM / scalar (reward) / value heads on one trunk.

Dimension legend (one meaning per letter, used in every einsum below):
  B batch          T query length      S key length (= T, or the KV-cache length)
  D embed (dim)    H query heads       K kv heads        G = H // K (queries per kv head)
  Dh head dim      F mlp hidden        V vocab           L layers

Conventions:
  * Parameters are stored in `param_dtype` (float32 by default); matmuls run in `dtype`
    (the compute dtype), and so does the residual stream; RMSNorm computes in float32 and
    returns the compute dtype; softmax and the returned logits are float32.
  * RoPE uses the rotate-half layout (the Hugging Face one): dimension i is paired with
    i + Dh/2. Meta's checkpoints pair (2i, 2i+1); the converters permute the rows of
    wq/wk at the boundary (the permutation Hugging Face applies), so the model computes
    exactly what Meta's reference computes. Rotate-half needs no interleaving shuffles,
    which is cheaper on TPU/GPU.
  * `segment_ids` [B, T]: tokens attend only to earlier tokens of the same segment;
    segment 0 marks padding, which is never attended to. Packed sequences use 1, 2, ...
  * The layer stack is always stored stacked ([L, ...] leading axis under
    `params["layers"]`), whether the forward pass runs it as a scan or fully unrolled
    (`scan_layers`), so checkpoints do not depend on that performance switch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Remat (activation checkpointing) policies for each layer of the stack.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

HEADS = ("lm", "score", "value")
BACKWARD_CHOICES = ("auto", "xla", "manual")  # mlp_backward, head_backward
ATTENTION = ("auto", "xla", "cudnn", "splash")
SCORE_POOLING = ("last", "mean")
# LlamaConfig fields that change how the same weights are computed with, not the weights
# or the function they compute: a run resumes from its checkpoints with any of them changed.
COMPUTE_ONLY_FIELDS = ("dtype", "remat_policy", "scan_layers", "decode_layers", "mlp_backward", "head_backward",
                       "attention")
# The fields a run started from another run's weights (`init_from`) takes from its own
# config, not the checkpoint's: the numerics above, plus those a fresh run may choose
# for the same weights (their storage dtype, the score head's pooling).
INIT_FROM_FIELDS = COMPUTE_ONLY_FIELDS + ("param_dtype", "score_pooling")

# Large negative used for the additive attention mask. A finite value (not -inf) keeps a
# fully masked row (a padding query) finite instead of NaN; any row with one valid key
# gets exactly zero weight on masked keys.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's formula (llama/model.py FeedForward)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model architecture. Field names of the first block follow Meta's `params.json`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    # Explicit FFN width (Hugging Face `intermediate_size`); None = Meta's formula.
    ffn_hidden_dim: int | None = None
    # Numerics and performance.
    dtype: str = "float32"  # compute dtype of the matmuls
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat_policy: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True  # lax.scan over layers (fast compile) or fully unrolled
    # How `generate` runs the layers in its decode loop: "stacked" (the scan above, over the
    # stacked params and cache), "layerwise" (per-layer copies of the params and per-layer
    # cache buffers made once before the loop, so no step slices weights or cache; costs a
    # second copy of the layer weights), or "auto" (layerwise on CPU and GPU, stacked on
    # TPU, where it is unmeasured). On an H200, layerwise decoded a bfloat16 7B 2.35x faster
    # than stacked at batch 1, at 98% of the measured copy bandwidth (README, Benchmarks).
    decode_layers: str = "auto"
    # How the SwiGLU MLP's gradient is computed: "xla" (JAX's autodiff), "manual" (our VJP,
    # `swiglu_mlp`: the same arithmetic, with each weight gradient one matmul contracting
    # the tokens of x and of the output gradient as they lie; XLA:CPU's autodiff instead
    # copies the [tokens, ffn] gradients into a transposed layout first), or "auto" (manual
    # on CPU without remat, where it was measured faster; xla elsewhere, so that remat
    # policies see the MLP's matmuls). The gradients agree with autodiff's to float
    # rounding; "xla" reproduces runs recorded with it (the toy recipe's trajectory).
    mlp_backward: str = "auto"
    # How the output head's gradient is computed: "xla" (autodiff), "manual" (our VJP,
    # `head_logits`: the weight gradient is one matmul contracting the tokens of the final
    # hidden states and of the logits' gradient as they lie; XLA:CPU's autodiff instead
    # copies the [tokens, vocab] logits gradient into a transposed layout and hands that
    # dot to a slower kernel), or "auto" (manual on CPU, xla elsewhere). With both on
    # "auto", the CPU train step of the issue-9 benchmark config ran 1.41x faster than
    # with both on "xla" (4.23 -> 2.99 s) and the tiny pretraining 1.36x (README).
    head_backward: str = "auto"
    # The attention kernel of calls without a KV cache (training, scoring, the reference
    # policy's log-probs): "xla" (our einsums with an explicit [B, H, T, T] score tensor;
    # every backend), "cudnn" (cuDNN's fused flash attention through
    # `jax.nn.dot_product_attention`, causal, with the packed-segment mask as a bias; GPU
    # only, bfloat16/float16 compute), "splash" (TPU's Pallas flash attention, JAX's Splash
    # kernel: causal, packed segments as segment ids, no mask tensor; on a CPU it runs
    # interpreted, slowly, which is how the tests check it; not on a GPU), or "auto" (cudnn
    # on a GPU when the compute dtype and head dim allow, xla elsewhere; splash is not
    # picked on a TPU until it has been measured there). Decoding with a cache always runs
    # the einsums. On an H200, cudnn trained a 7B-shaped model 1.85x faster than xla, in
    # 40% of the memory (README).
    attention: str = "auto"
    # Which hidden states the reward model's score head reads (the paper leaves it open):
    # "last" = the last real token (the usual choice), "mean" = the mean over the scored
    # answer's tokens, EOS included (`score_mask`), i.e. the mean of per-token scores.
    score_pooling: str = "last"

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"LlamaConfig.{field}: {why}")

        for f in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive integer, got {v!r}")
        for f in ("n_kv_heads", "ffn_hidden_dim"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                bad(f, f"must be a positive integer or None, got {v!r}")
        for f in ("norm_eps", "rope_theta") + (("ffn_dim_multiplier",) if self.ffn_dim_multiplier is not None else ()):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
                bad(f, f"must be a finite number > 0{' or None' if f == 'ffn_dim_multiplier' else ''}, got {v!r}")
        if self.ffn_hidden_dim is None and self.hidden_dim <= 0:
            bad("ffn_dim_multiplier", f"{self.ffn_dim_multiplier} gives an FFN width of {self.hidden_dim}")
        if not isinstance(self.scan_layers, bool):  # "false" would be true
            bad("scan_layers", f"must be true or false, got {self.scan_layers!r}")
        if self.dim % self.n_heads:
            bad("n_heads", f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            bad("dim", f"head_dim = dim/n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            bad("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                bad(f, f"{getattr(self, f)!r} is not one of {sorted(DTYPES)}")
        if self.decode_layers not in ("auto", "stacked", "layerwise"):
            bad("decode_layers", f"{self.decode_layers!r} is not one of ['auto', 'layerwise', 'stacked']")
        for f in ("mlp_backward", "head_backward"):
            if getattr(self, f) not in BACKWARD_CHOICES:
                bad(f, f"{getattr(self, f)!r} is not one of {list(BACKWARD_CHOICES)}")
        if self.attention not in ATTENTION:
            bad("attention", f"{self.attention!r} is not one of {list(ATTENTION)}")
        if self.score_pooling not in SCORE_POOLING:
            bad("score_pooling", f"{self.score_pooling!r} is not one of {list(SCORE_POOLING)}")
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", f"{self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")

    # -- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def num_params(self, heads: Sequence[str] = ("lm",)) -> int:
        """Exact parameter count (embedding, layers, final norm, and the given heads)."""
        d, f = self.dim, self.hidden_dim
        attn = d * self.n_heads * self.head_dim * 2 + d * self.kv_heads * self.head_dim * 2
        per_layer = attn + 3 * d * f + 2 * d
        n = self.vocab_size * d + self.n_layers * per_layer + d
        n += sum({"lm": d * self.vocab_size, "score": d + 1, "value": d + 1}[h] for h in heads)
        return n

    def matmul_params(self, heads: tuple[str, ...] = ("lm",)) -> int:
        """N_matmul: parameters that take part in matmuls per token (the output heads
        counted: the LM head's dim x vocab, a scalar head's dim; the input embedding
        lookup not); the MFU convention."""
        d, hd = self.dim, self.head_dim
        attn = d * (self.n_heads + 2 * self.kv_heads) * hd + self.n_heads * hd * d
        return self.n_layers * (attn + 3 * d * self.hidden_dim) + sum(
            d * self.vocab_size if h == "lm" else d for h in heads)

    def train_flops_per_token(self, seq_len: int, causal: bool = True, heads: tuple[str, ...] = ("lm",)) -> float:
        """Training FLOPs per token: 6 N_matmul + attention (6 L T H Dh with a causal
        mask counted as half the work; 12 L T H Dh without)."""
        attn = (6 if causal else 12) * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 6.0 * self.matmul_params(heads) + attn

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Builds a config from a dict (e.g. Meta's params.json); unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; known: {sorted(fields)}")
        return cls(**d)

    # -- presets (Meta's params.json; 34B shapes from Code Llama 34B) ------------------
    @classmethod
    def llama2_7b(cls, **kw) -> "LlamaConfig":
        return cls(dim=4096, n_layers=32, n_heads=32, **kw)

    @classmethod
    def llama2_13b(cls, **kw) -> "LlamaConfig":
        return cls(dim=5120, n_layers=40, n_heads=40, **kw)

    @classmethod
    def llama2_34b(cls, **kw) -> "LlamaConfig":
        return cls(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0, **kw)

    @classmethod
    def llama2_70b(cls, **kw) -> "LlamaConfig":
        return cls(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                   ffn_dim_multiplier=1.3, **kw)

    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """A ~1M-parameter model for tests and CPU demos (GQA, 4 layers)."""
        base = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512,
                    multiple_of=32, max_seq_len=512)
        base.update(kw)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **kw) -> "LlamaConfig":
        presets = {"7b": cls.llama2_7b, "13b": cls.llama2_13b, "34b": cls.llama2_34b,
                   "70b": cls.llama2_70b, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**kw)


# ----------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Explicit decoding cache, passed into the model and returned updated.

    k, v:        [L, B, K, S, Dh] keys (after RoPE) and values of every layer, kv heads
                 before slots: the layout the attention matmuls read without a transpose.
    segment_ids: [B, S] int32 segment of each cache slot; 0 = empty or padding.
    index:       [] int32 number of slots written so far (the next write position).
    """

    k: Array
    v: Array
    segment_ids: Array
    index: Array

    @classmethod
    def init(cls, config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> "KVCache":
        dtype = config.compute_dtype if dtype is None else dtype
        shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    # Logical axis names, for sharding a cache like the activations it came from.
    logical_axes = {"k": ("layers", "batch", "kv_heads", "length", "head_dim"),
                    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
                    "segment_ids": ("batch", "length"), "index": ()}


# ----------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Sharding constraint by logical axis names (no-op unless a mesh and rules are set;
    see `llama_jax.sharding.activate`)."""
    from llama_jax import sharding  # local import: sharding imports this module

    return sharding.constrain(x, names)


def _param(module: nn.Module, name: str, init, shape, names, dtype):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


def rope_frequencies(head_dim: int, theta: float) -> Array:
    """[Dh/2] inverse frequencies theta^(-2i/Dh)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, rotate-half layout. x: [B, T, N, Dh], positions: [B, T]."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[:, :, None] * rope_frequencies(x.shape[-1], theta)[None, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel: str = "xla"  # of calls without a cache: "xla", "cudnn" or "splash" (attention_kernel)

    @nn.compact
    def __call__(self, x, positions, q_seg, layer_cache, k_seg, cache_index):
        """x [B,T,D]; positions/q_seg [B,T];
        layer_cache None or (k, v) each [B,K,S,Dh]; k_seg [B,S] segment of each key slot;
        cache_index [] where this call's keys will be written in the cache (by the caller:
        with a cache, the second output is this call's (k, v), each [B,T,K,Dh])."""
        D = x.shape[-1]
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        init = nn.initializers.normal(stddev=0.02)
        wq = _param(self, "wq", init, (D, H, Dh), ("embed", "heads", "head_dim"), self.param_dtype)
        wk = _param(self, "wk", init, (D, K, Dh), ("embed", "kv_heads", "head_dim"), self.param_dtype)
        wv = _param(self, "wv", init, (D, K, Dh), ("embed", "kv_heads", "head_dim"), self.param_dtype)
        wo = _param(self, "wo", init, (H, Dh, D), ("heads", "head_dim", "embed"), self.param_dtype)
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("btd,dhk->bthk", x, wq.astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, wk.astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, wv.astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)

        G = H // K
        scale = 1.0 / math.sqrt(Dh)
        qg = q.reshape(q.shape[0], q.shape[1], K, G, Dh)  # query head j -> kv head j // G
        # This call's own keys: causal in slot order, same segment, never padding.
        T = q.shape[1]
        own = (jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]) \
            & (q_seg[:, :, None] == q_seg[:, None, :]) & (q_seg[:, None, :] != 0)  # [B,T,T]
        if layer_cache is None and self.kernel == "cudnn":
            new_cache = None
            # Causal (the kernel skips the blocks above the diagonal) plus the segment mask,
            # which cuDNN takes as an additive bias; GQA by the kernel's own head grouping.
            out = jax.nn.dot_product_attention(q, k, v, mask=own[:, None, :, :], scale=scale, is_causal=True,
                                               implementation="cudnn")
        elif layer_cache is None and self.kernel == "splash":
            new_cache = None
            out = splash_attention(q, k, v, q_seg, scale)
        elif layer_cache is None:
            new_cache = None
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                                preferred_element_type=jnp.float32) * scale + _additive_mask(own)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        else:
            # Decoding: attend to the slots already in the cache (read only) and to this
            # call's keys, one softmax over both. The caller writes the new keys into the
            # cache once, after the layer stack, so the cache is not copied per layer.
            ck, cv = layer_cache
            new_cache = (k.astype(ck.dtype), v.astype(cv.dtype))
            k, v = new_cache[0].astype(dt), new_cache[1].astype(dt)  # what the cache will hold
            old = (jnp.arange(ck.shape[2], dtype=jnp.int32)[None, None, :] < cache_index) \
                & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)  # [B,T,S]
            old_scores = jnp.einsum("btkgd,bksd->bkgts", qg, ck.astype(dt),
                                    preferred_element_type=jnp.float32) * scale + _additive_mask(old)
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                                preferred_element_type=jnp.float32) * scale + _additive_mask(own)
            probs = jax.nn.softmax(jnp.concatenate([old_scores, scores], axis=-1), axis=-1).astype(dt)
            S = ck.shape[2]
            if T == 1 and G > 1 and jax.default_backend() == "cpu":
                # a decode step with grouped queries: XLA:CPU ran this batched [G, S] x [S, Dh] dot 2-5x slower
                # than the same sum written as a product and a reduction (the toy at batch 64-2,048; G 2-8 at
                # batch 1-16, S 160). With G = 1 it is the other way round (batch 16, S 160, Dh 64: 0.2 ms
                # against 5.4), so ungrouped heads keep the dot (session 29)
                old_out = jnp.sum(probs[:, :, :, 0, :S, None] * cv.astype(dt)[:, :, None], axis=3)[:, None]
            else:
                old_out = jnp.einsum("bkgts,bksd->btkgd", probs[..., :S], cv.astype(dt))
            out = old_out + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], v)
        out = out.reshape(q.shape)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = jnp.einsum("bthk,hkd->btd", out, wo.astype(dt))
        return y, new_cache


def _additive_mask(allowed: Array) -> Array:
    """[B,T,S] booleans -> the float32 bias added to [B,K,G,T,S] attention scores."""
    return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None, :, :]


def _swiglu_forward(x, w1, w3, w2):
    gate = jnp.einsum("btd,df->btf", x, w1)
    up = jnp.einsum("btd,df->btf", x, w3)
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return jnp.einsum("btf,fd->btd", h, w2), (gate, up)


@jax.custom_vjp
def swiglu_mlp(x, w1, w3, w2):
    """w2(silu(x w1) * (x w3)) with a hand-written backward (LlamaConfig.mlp_backward)."""
    return _swiglu_forward(x, w1, w3, w2)[0]


def _swiglu_mlp_fwd(x, w1, w3, w2):
    out, (gate, up) = _swiglu_forward(x, w1, w3, w2)
    return out, (x, w1, w3, w2, gate, up)  # h is recomputed from gate and up


def _swiglu_mlp_bwd(res, dout):
    x, w1, w3, w2, gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    dw2 = jnp.einsum("btf,btd->fd", silu * up, dout)
    dh = jnp.einsum("btd,fd->btf", dout, w2)
    dgate = constrain(dh * up * sig * (1 + gate * (1 - sig)), ("batch", "length", "mlp"))  # silu' = s(1 + g(1 - s))
    dup = constrain(dh * silu, ("batch", "length", "mlp"))
    dw1 = jnp.einsum("btd,btf->df", x, dgate)
    dw3 = jnp.einsum("btd,btf->df", x, dup)
    dx = jnp.einsum("btf,df->btd", dgate, w1) + jnp.einsum("btf,df->btd", dup, w3)
    return dx, dw1, dw3, dw2


swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


def attention_kernel(config: "LlamaConfig") -> str:
    """The attention kernel of calls without a cache: "xla", "cudnn" or "splash"
    (LlamaConfig.attention, with "auto" resolved for this backend)."""
    if config.attention == "auto":  # cuDNN's flash kernels take head dims that are multiples of 8, up to 128
        gpu = (jax.default_backend() == "gpu" and config.dtype in ("bfloat16", "float16")
               and config.head_dim % 8 == 0 and config.head_dim <= 128)
        return "cudnn" if gpu else "xla"
    if config.attention == "splash" and jax.default_backend() == "gpu":
        raise ValueError("LlamaConfig.attention: 'splash' is the TPU's Pallas kernel; on a GPU use 'cudnn' "
                         "(on a CPU it runs interpreted, for tests)")
    return config.attention


def check_attention_kernel(config: "LlamaConfig") -> str:
    """`attention_kernel`, and a ValueError naming the field for a kernel that cannot run
    here (cuDNN's own errors name neither): for runs and CLIs, before any work. (The
    model itself does not check cudnn's: the tests run its wiring on a CPU with JAX's XLA
    kernel in its place.)"""
    kernel = attention_kernel(config)
    if config.attention == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"LlamaConfig.attention: 'cudnn' needs a GPU (this backend: {jax.default_backend()}); "
                             "use 'auto' or 'xla'")
        if config.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"LlamaConfig.attention: 'cudnn' computes in bfloat16 or float16, not "
                             f"dtype={config.dtype!r}; set model.dtype or use 'xla'")
        if config.head_dim % 8 or config.head_dim > 128:
            raise ValueError(f"LlamaConfig.attention: 'cudnn' takes head dims that are multiples of 8 up to 128, "
                             f"not {config.head_dim} (dim / n_heads); use 'xla'")
    return kernel


SPLASH_BLOCKS = (512, 256, 128)  # Splash's block sizes must be multiples of 128 (the TPU's lanes)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, scale: float) -> Array:
    """Causal attention within segments by JAX's Splash kernel (Pallas, TPU).

    q [B, T, H, Dh], k and v [B, T, K, Dh], segment_ids [B, T] -> [B, T, H, Dh]. Query head
    j reads kv head j // (H // K), as in the einsums. The kernel takes one row's [heads,
    length, Dh] with the segment ids as they are (no [T, T] mask is built); rows are mapped
    over with vmap. Lengths are padded to a multiple of 128 with a segment id (-1) that no
    token has, so padded slots attend only to each other and are dropped. Under an active
    mesh (`sharding.activate`) the kernel runs per shard inside `shard_map`: rows split as
    the rules split `batch`, heads as they split `heads` when `kv_heads` splits the same
    way (else each shard computes every head). Off a TPU the kernel runs interpreted."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    from llama_jax import sharding  # local import: sharding imports this module

    B, T, H, Dh = q.shape
    pad = -T % SPLASH_BLOCKS[-1]
    L = T + pad
    block = next(b for b in SPLASH_BLOCKS if L % b == 0)
    def heads_first(x):  # [B, T, N, Dh] -> [B, N, L, Dh]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q, k, v = heads_first((q * scale).astype(q.dtype)), heads_first(k), heads_first(v)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    interpret = jax.default_backend() != "tpu"

    def rows(q, k, v, seg):  # [b, h, L, Dh] x2 [b, k, L, Dh], [b, L]: one shard's rows and heads
        kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.CausalMask((L, L))] * q.shape[1]),
                                        head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(q, k, v, seg)

    q_spec = sharding.active_spec(("batch", "heads", None, None), q.shape)
    if q_spec is not None:
        kv_spec = sharding.active_spec(("batch", "kv_heads", None, None), k.shape)
        heads = q_spec[1] if q_spec[1] == kv_spec[1] else None  # a query head's kv head must be on its shard
        q_spec, kv_spec = (jax.sharding.PartitionSpec(q_spec[0], heads, None, None),) * 2
        rows = jax.shard_map(rows, in_specs=(q_spec, kv_spec, kv_spec, jax.sharding.PartitionSpec(q_spec[0], None)),
                             out_specs=q_spec, check_vma=False)
    out = rows(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :T]


def _logits(x, w):
    """[B, T, D] hidden states . [D, V] output weights -> float32 logits."""
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)


# _logits with a hand-written backward (LlamaConfig.head_backward)
head_logits = jax.custom_vjp(_logits)


def _head_logits_fwd(x, w):
    return _logits(x, w), (x, w)


def _head_logits_bwd(res, dlogits):
    x, w = res  # dlogits stays float32, as in autodiff's transpose of the float32-accumulated dot
    dx = jnp.einsum("btv,dv->btd", dlogits, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("btd,btv->dv", x, dlogits, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def manual_head_backward(config: "LlamaConfig") -> bool:
    if config.head_backward == "auto":
        return jax.default_backend() == "cpu"
    return config.head_backward == "manual"


def manual_mlp_backward(config: "LlamaConfig") -> bool:
    if config.mlp_backward == "auto":
        return jax.default_backend() == "cpu" and config.remat_policy == "none"
    return config.mlp_backward == "manual"


class FeedForward(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    manual_backward: bool = False  # swiglu_mlp's VJP instead of autodiff (LlamaConfig.mlp_backward)

    @nn.compact
    def __call__(self, x):
        D, F = x.shape[-1], self.hidden_dim
        init = nn.initializers.normal(stddev=0.02)
        w1 = _param(self, "w1", init, (D, F), ("embed", "mlp"), self.param_dtype)
        w3 = _param(self, "w3", init, (D, F), ("embed", "mlp"), self.param_dtype)
        w2 = _param(self, "w2", init, (F, D), ("mlp", "embed"), self.param_dtype)
        dt = self.dtype
        args = (x.astype(dt), w1.astype(dt), w3.astype(dt), w2.astype(dt))
        return swiglu_mlp(*args) if self.manual_backward else _swiglu_forward(*args)[0]


class Block(nn.Module):
    """One transformer layer: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, q_seg, k_seg, cache_index):
        c = self.config
        dt, pdt = c.compute_dtype, c.weight_dtype
        attn_out, new_cache = Attention(c.n_heads, c.kv_heads, c.head_dim, c.rope_theta, dt, pdt,
                                        attention_kernel(c), name="attention")(
            RMSNorm(c.norm_eps, pdt, name="attention_norm")(x),
            positions, q_seg, layer_cache, k_seg, cache_index)
        h = x + attn_out
        out = h + FeedForward(c.hidden_dim, dt, pdt, manual_mlp_backward(c), name="feed_forward")(
            RMSNorm(c.norm_eps, pdt, name="ffn_norm")(h))
        out = constrain(out, ("batch", "length", "embed"))
        return out, new_cache


def last_token_index(segment_ids: Array) -> Array:
    """[B] index of the last non-padding (segment != 0) token of each row."""
    T = segment_ids.shape[1]
    is_real = segment_ids != 0
    return T - 1 - jnp.argmax(is_real[:, ::-1], axis=1)


class Llama(nn.Module):
    """The Llama 2 decoder with one or more heads on the shared trunk.

    heads: ("lm",) next-token logits [B, T, V] (float32);
           ("score",) reward-model score [B] read at the last non-padding token, or
                      averaged over `score_mask` (config.score_pooling "mean");
           ("value",) per-token value [B, T] (PPO critic).
    With one head the call returns its output; with several, a dict by head name.
    With a `cache`, the call returns (outputs, new_cache).
    detach_value: the value head reads the trunk's features through stop_gradient, so a
    loss on the values trains the head alone and never moves the trunk (PPO's
    `ppo.detach_value`).
    """

    config: LlamaConfig
    heads: tuple[str, ...] = ("lm",)
    detach_value: bool = False

    def setup(self):
        c = self.config
        for h in self.heads:
            if h not in HEADS:
                raise ValueError(f"unknown head {h!r}; choose from {HEADS}")
        pdt = c.weight_dtype
        init = nn.initializers.normal(stddev=0.02)
        self.tok_embeddings = nn.Embed(
            c.vocab_size, c.dim, embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
            param_dtype=pdt, dtype=c.compute_dtype, name="tok_embeddings")
        block = Block
        policy = REMAT_POLICIES[c.remat_policy]
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.n_layers,
            unroll=1 if c.scan_layers else c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        self.norm = RMSNorm(c.norm_eps, pdt, name="norm")
        if "lm" in self.heads:
            self.output = self.param("output", nn.with_logical_partitioning(init, ("embed", "vocab")),
                                     (c.dim, c.vocab_size), pdt)
        head_init = nn.initializers.normal(stddev=1.0 / math.sqrt(c.dim + 1))
        for h in ("score", "value"):
            if h in self.heads:
                setattr(self, f"{h}_head", nn.Dense(
                    1, dtype=jnp.float32, param_dtype=pdt, name=f"{h}_head",
                    kernel_init=nn.with_logical_partitioning(head_init, ("embed", None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,))))

    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: KVCache | None = None, score_mask: Array | None = None):
        """tokens [B, T] int; positions [B, T] (default: 0.. or continuing the cache);
        segment_ids [B, T] (default all 1; 0 = padding); score_mask [B, T] the scored
        answer's tokens (needed by the score head when config.score_pooling is "mean").
        With a cache, the call writes slots index .. index + T - 1, which must be below the
        cache's max_len: T larger than max_len is an error here, but an index run past it
        (a known value only inside jit) is not checked, and its writes land on the last slot,
        wrongly; `generate` sizes its cache for the prompt and every new token. Neither this
        call nor RoPE enforces config.max_seq_len (training and `generate` check it)."""
        B, T = tokens.shape
        if cache is not None and T > cache.max_len:
            raise ValueError(f"Llama: {T} tokens do not fit a KV cache of {cache.max_len} slots")
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if cache is None:
            start = jnp.zeros((), jnp.int32)
            k_seg = segment_ids
            layer_cache = None
        else:
            start = cache.index
            k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (jnp.zeros((), jnp.int32), start))
            layer_cache = (cache.k, cache.v)
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))

        x = self.embed(tokens)
        x, new_layer_cache = self.layers(x, layer_cache, positions, segment_ids, k_seg, start)
        out = self.head(x, segment_ids, score_mask)
        if cache is None:
            return out
        # The layers return only this call's keys/values [L, B, T, K, Dh]: one in-place write.
        zero = jnp.zeros((), jnp.int32)
        at = (zero, zero, zero, start, zero)
        new_k, new_v = (jnp.swapaxes(a, 2, 3) for a in new_layer_cache)
        new_cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, new_k, at),
                            v=jax.lax.dynamic_update_slice(cache.v, new_v, at),
                            segment_ids=k_seg, index=start + T)
        return out, new_cache

    def embed(self, tokens: Array) -> Array:
        """[B, T] tokens -> [B, T, D] input of the layer stack."""
        return constrain(self.tok_embeddings(tokens), ("batch", "length", "embed"))

    def head(self, x: Array, segment_ids: Array, score_mask: Array | None = None):
        """Output of the layer stack [B, T, D] -> the heads' outputs (see the class doc)."""
        c = self.config
        x = self.norm(x)
        outputs = {}
        if "lm" in self.heads:
            logits = (head_logits if manual_head_backward(c) else _logits)(
                x.astype(c.compute_dtype), self.output.astype(c.compute_dtype))
            outputs["lm"] = constrain(logits, ("batch", "length", "vocab"))
        if "value" in self.heads:
            features = jax.lax.stop_gradient(x) if self.detach_value else x
            outputs["value"] = self.value_head(features.astype(jnp.float32))[..., 0]
        if "score" in self.heads:
            if c.score_pooling == "mean":
                if score_mask is None:
                    if not self.is_initializing():
                        raise ValueError("score_pooling='mean' needs the answer's score_mask")
                    score_mask = segment_ids
                m = (score_mask * (segment_ids != 0)).astype(jnp.float32)[..., None]
                pooled = jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
            else:
                last = last_token_index(segment_ids)
                pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
            outputs["score"] = self.score_head(pooled.astype(jnp.float32))[..., 0]
        return outputs[self.heads[0]] if len(self.heads) == 1 else outputs


# ----------------------------------------------------------------------------------
# Layer-by-layer decoding (LlamaConfig.decode_layers)
# ----------------------------------------------------------------------------------


def use_layerwise_decode(config: LlamaConfig) -> bool:
    if config.decode_layers == "auto":
        return jax.default_backend() in ("cpu", "gpu")
    return config.decode_layers == "layerwise"


def unstack_layers(params) -> list:
    """The stacked layer params ([L, ...] under params["layers"]) as L per-layer trees."""
    n = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"]) for i in range(n)]


def layerwise_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """A KVCache whose k and v are tuples of L separate [B, K, S, Dh] buffers."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch_size, config.kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
                   segment_ids=jnp.zeros((batch_size, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def apply_layerwise(config: LlamaConfig, params, layers: list, tokens: Array, positions: Array,
                    segment_ids: Array, cache: KVCache, heads: tuple[str, ...] = ("lm",), last_only: bool = False):
    """What `Llama(config, heads).apply({"params": params}, tokens, positions, segment_ids,
    cache=cache)` computes, with the layers run one by one from `layers` (unstack_layers)
    and a `layerwise_cache`: inside a decode loop no step slices the stacked weights or
    cache (XLA:CPU copies such slices every step). Returns (outputs, new cache).
    `last_only`: the heads read the last position only (outputs [B, 1, ...]), what a prefill
    needs: its [B, T, V] logits were 8% of a toy generation at batch 2,048."""
    model = Llama(config, heads)
    block = Block(config, parent=None)
    B, T = tokens.shape
    segment_ids = segment_ids.astype(jnp.int32)
    start = cache.index
    zero = jnp.zeros((), jnp.int32)
    k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (zero, start))
    x = model.apply({"params": params}, tokens, method=Llama.embed)
    ks, vs = [], []
    for layer_params, ck, cv in zip(layers, cache.k, cache.v):
        x, (k, v) = block.apply({"params": layer_params}, x, (ck, cv), positions, segment_ids, k_seg, start)
        # Write after the layer has read the old slots (x depends on those reads): with this
        # order explicit, XLA updates the buffers in place instead of copying them each step.
        ck, cv, x = jax.lax.optimization_barrier((ck, cv, x))
        ks.append(jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2), (zero, zero, start, zero)))
        vs.append(jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2), (zero, zero, start, zero)))
    if last_only:
        x, segment_ids = x[:, -1:], segment_ids[:, -1:]
    out = model.apply({"params": params}, x, segment_ids, method=Llama.head)
    return out, KVCache(k=tuple(ks), v=tuple(vs), segment_ids=k_seg, index=start + T)


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
