"""Weight conversion between llama_jax params and other checkpoint layouts.

This module currently reads Hugging Face Llama directories (`from_hf`). Meta's layout
and the exporters arrive with the conversion CLI.

The llama_jax parameter tree (frozen; Meta's names, stacked layers):

  tok_embeddings/embedding   [V, D]
  layers/attention_norm/scale [L, D]       layers/ffn_norm/scale [L, D]
  layers/attention/wq        [L, D, H, Dh]  layers/attention/wk   [L, D, K, Dh]
  layers/attention/wv        [L, D, K, Dh]  layers/attention/wo   [L, H, Dh, D]
  layers/feed_forward/w1     [L, D, F]      layers/feed_forward/w3 [L, D, F]
  layers/feed_forward/w2     [L, F, D]
  norm/scale                 [D]
  output                     [D, V]

RoPE: the model uses the rotate-half layout, which is the layout of Hugging Face's
q_proj/k_proj rows, so HF weights need no permutation. Meta's `consolidated.*.pth`
rows use interleaved pairs and go through `permute_rotary` on import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from llama_jax.model import DTYPES, LlamaConfig


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file and the problem."""


# ----------------------------------------------------------------------------------
# RoPE layouts
# ----------------------------------------------------------------------------------


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta -> rotate-half row order of a [n_heads*Dh, D] q or k projection (the
    permutation Hugging Face's converter applies; for k, n_heads is n_kv_heads)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_rotary` (rotate-half -> Meta's interleaved rows)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# ----------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
    """LlamaConfig from a Hugging Face Llama `config.json` dict. Features the model does
    not implement are an error naming the field."""

    def bad(field, why):
        raise ConversionError(f"{source}: {field}: {why}")

    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        bad("model_type", f"{model_type!r} is not supported (only 'llama')")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in hf:
            bad(key, "missing")
    if hf.get("hidden_act", "silu") != "silu":
        bad("hidden_act", f"{hf['hidden_act']!r} is not supported (Llama uses 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        bad("attention_bias/mlp_bias", "biases are not supported (Llama has none)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type not in ("default", None):
        bad("rope_scaling", f"RoPE scaling {scaling or rope!r} is not supported (Llama 2 uses plain RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and dim % n_heads == 0 and head_dim != dim // n_heads:
        bad("head_dim", f"{head_dim} != hidden_size/num_attention_heads = {dim // n_heads} is not supported")
    fields = dict(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        vocab_size=hf["vocab_size"],
        ffn_hidden_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
    )
    fields.update(overrides)
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


class _SafetensorsReader:
    """Lazy tensor access across a single file or a sharded index."""

    def __init__(self, path: str):
        from safetensors import safe_open

        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(os.listdir(path))
            hint = " (PyTorch pickles are not loaded: convert them to safetensors)" if any(
                f.endswith(".bin") for f in found) else ""
            raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        self.handles = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.exists(full):
                raise ConversionError(f"{full}: listed in the safetensors index but missing")
            try:
                self.handles[name] = safe_open(full, framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise ConversionError(f"{full}: cannot read safetensors file ({e})") from None
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}
        self.weight_map = weight_map
        self.path = path

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.weight_map:
            raise ConversionError(f"{self.path}: tensor {key!r} is missing")
        t = self.handles[self.weight_map[key]].get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(shape)}")
        return t


def from_hf(path: str, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Reads a Hugging Face Llama directory (`config.json` + `model.safetensors` or a
    sharded `model.safetensors.index.json`). Returns (LlamaConfig, params) with params as
    host numpy arrays in the config's `param_dtype`; place them on a mesh with
    `llama_jax.sharding.shard_params`. `config_overrides` set LlamaConfig fields that HF
    does not describe (dtype, remat_policy, scan_layers, ...)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a directory")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"{cfg_path}: missing (not a Hugging Face model directory?)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = config_from_hf(hf, source=cfg_path, **config_overrides)
    reader = _SafetensorsReader(path)
    out_dtype = np.dtype(DTYPES[cfg.param_dtype])
    D, H, K, Dh = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    F, V, L = cfg.hidden_dim, cfg.vocab_size, cfg.n_layers

    def get(key, shape):
        return reader.get(key, shape).astype(out_dtype)

    # (hf name, hf shape, our shape, transform from hf to ours)
    per_layer = {
        ("attention_norm", "scale"): ("input_layernorm.weight", (D,), lambda w: w),
        ("ffn_norm", "scale"): ("post_attention_layernorm.weight", (D,), lambda w: w),
        ("attention", "wq"): ("self_attn.q_proj.weight", (H * Dh, D), lambda w: w.T.reshape(D, H, Dh)),
        ("attention", "wk"): ("self_attn.k_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh)),
        ("attention", "wv"): ("self_attn.v_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh)),
        ("attention", "wo"): ("self_attn.o_proj.weight", (D, H * Dh), lambda w: w.T.reshape(H, Dh, D)),
        ("feed_forward", "w1"): ("mlp.gate_proj.weight", (F, D), lambda w: w.T),
        ("feed_forward", "w3"): ("mlp.up_proj.weight", (F, D), lambda w: w.T),
        ("feed_forward", "w2"): ("mlp.down_proj.weight", (D, F), lambda w: w.T),
    }
    layers: dict[str, dict[str, np.ndarray]] = {}
    for (mod, leaf), (hf_name, hf_shape, fn) in per_layer.items():
        stacked = None
        for i in range(L):
            w = fn(get(f"model.layers.{i}.{hf_name}", hf_shape))
            if stacked is None:
                stacked = np.empty((L,) + w.shape, out_dtype)
            stacked[i] = w
        layers.setdefault(mod, {})[leaf] = stacked

    embed = get("model.embed_tokens.weight", (V, D))
    if "lm_head.weight" in reader.weight_map:
        output = get("lm_head.weight", (V, D)).T
    elif hf.get("tie_word_embeddings"):
        output = embed.T  # tied in HF; llama_jax keeps an untied copy
    else:
        raise ConversionError(f"{path}: tensor 'lm_head.weight' is missing")
    params = {
        "tok_embeddings": {"embedding": embed},
        "layers": layers,
        "norm": {"scale": get("model.norm.weight", (D,))},
        "output": np.ascontiguousarray(output),
    }
    return cfg, params
