"""Weight conversion between llama_jax params and other checkpoint layouts.

    python -m llama_jax.convert --from=meta --src=llama-2-7b/ --dst=ckpt/7b     (Meta -> llama_jax)
    python -m llama_jax.convert --from=hf --src=Llama-2-7b-hf/ --dst=ckpt/7b    (HF -> llama_jax)
    python -m llama_jax.convert --to=hf --src=ckpt/7b --dst=out/hf              (llama_jax -> HF, 5GB files)
    python -m llama_jax.convert --to=meta --src=ckpt/7b --dst=out/meta          (llama_jax -> Meta)

Imports write a params-only llama_jax checkpoint (the layout of `checkpoint.export`) with
the source's tokenizer.model, which generate, chat and `init_from` accept.

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

import argparse
import json
import math
import os
import shutil
import sys
from typing import Any

import numpy as np

from llama_jax.model import DTYPES, LlamaConfig, meta_ffn_hidden_dim
from llama_jax.tokenizer import Tokenizer


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

    if "hidden_size" not in hf and isinstance(hf.get("model"), dict) and "stage" in hf:  # a run's own config.json
        raise ConversionError(f"{source}: a llama_jax run's config.json, not a Hugging Face model's: llama_jax reads "
                              "a run or checkpoint as it is (--config.init_from, --checkpoint); `python -m "
                              "llama_jax.convert --to=hf --src=RUN --dst=DIR` exports one to Hugging Face")
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
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        bad("rope_scaling", f"expected an object or null, got {scaling!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None) \
            or rope_type not in ("default", None):
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
        name = self.weight_map[key]
        try:
            t = self.handles[name].get_tensor(key)
        except Exception as e:  # an index that names the wrong file; safetensors' own error types
            raise ConversionError(f"{os.path.join(self.path, name)}: cannot read tensor {key!r}, which "
                                  f"model.safetensors.index.json places there ({e})") from None
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(shape)}")
        return t


def _layout(cfg: LlamaConfig):
    """Per-layer tensors: our (module, leaf) -> (HF name, HF shape, HF->ours, ours->HF)."""
    D, H, K, Dh, F = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim
    same = (lambda w: w, lambda w: w)
    return {
        ("attention_norm", "scale"): ("input_layernorm.weight", (D,)) + same,
        ("ffn_norm", "scale"): ("post_attention_layernorm.weight", (D,)) + same,
        ("attention", "wq"): ("self_attn.q_proj.weight", (H * Dh, D), lambda w: w.T.reshape(D, H, Dh),
                              lambda w: w.reshape(D, H * Dh).T),
        ("attention", "wk"): ("self_attn.k_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh),
                              lambda w: w.reshape(D, K * Dh).T),
        ("attention", "wv"): ("self_attn.v_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh),
                              lambda w: w.reshape(D, K * Dh).T),
        ("attention", "wo"): ("self_attn.o_proj.weight", (D, H * Dh), lambda w: w.T.reshape(H, Dh, D),
                              lambda w: w.reshape(H * Dh, D).T),
        ("feed_forward", "w1"): ("mlp.gate_proj.weight", (F, D), lambda w: w.T, lambda w: w.T),
        ("feed_forward", "w3"): ("mlp.up_proj.weight", (F, D), lambda w: w.T, lambda w: w.T),
        ("feed_forward", "w2"): ("mlp.down_proj.weight", (D, F), lambda w: w.T, lambda w: w.T),
    }


def _progress(total: int, what: str):
    from llama_jax.metrics import Progress

    return Progress(total, what=what, throttle=True, delay=2.0)


def params_from_hf_tensors(get, cfg: LlamaConfig, has_lm_head: bool = True) -> dict:
    """Builds llama_jax params from HF-named tensors. `get(name, shape)` returns a
    numpy array (and checks its shape); without an lm_head the embedding is copied.
    Layer by layer, with progress on stderr; each tensor is copied once, into its place
    in the stacked array."""
    out_dtype = np.dtype(DTYPES[cfg.param_dtype])
    L = cfg.n_layers
    layers: dict[str, dict[str, np.ndarray]] = {}
    progress = _progress(L, "layers read")
    for i in range(L):
        for (mod, leaf), (hf_name, hf_shape, to_ours, _) in _layout(cfg).items():
            w = to_ours(get(f"model.layers.{i}.{hf_name}", hf_shape))
            stacked = layers.setdefault(mod, {}).get(leaf)
            if stacked is None:
                stacked = layers[mod][leaf] = np.empty((L,) + w.shape, out_dtype)
            stacked[i] = w  # casts as it copies
        progress.update(i + 1)
    progress.close()
    embed = np.array(get("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim)), out_dtype)  # a copy: not a
    # view that would keep a memory-mapped source file alive
    head = get("lm_head.weight", (cfg.vocab_size, cfg.dim)) if has_lm_head else embed
    output = np.empty((cfg.dim, cfg.vocab_size), out_dtype)
    output[...] = head.T
    return {
        "tok_embeddings": {"embedding": embed},
        "layers": layers,
        "norm": {"scale": np.array(get("model.norm.weight", (cfg.dim,)), out_dtype)},
        "output": output,
    }


def iter_hf_tensors(params, cfg: LlamaConfig, dtype=np.float32):
    """(HF name, array) of llama_jax params, one tensor at a time in HF's order (rotate-half
    q/k rows, as HF stores them): each made when asked for, so that a writer holds one
    file's tensors, not a second copy of the model."""
    dtype = np.dtype(dtype)

    def host(x, i=None):
        a = np.asarray(x)  # a host array's own buffer: no copy
        a = a if i is None else a[i]
        return a if a.dtype == dtype else a.astype(dtype)

    yield "model.embed_tokens.weight", host(params["tok_embeddings"]["embedding"])
    for i in range(cfg.n_layers):
        for (mod, leaf), (hf_name, _, _, to_hf) in _layout(cfg).items():
            yield f"model.layers.{i}.{hf_name}", np.ascontiguousarray(to_hf(host(params["layers"][mod][leaf], i)))
    yield "model.norm.weight", host(params["norm"]["scale"])
    yield "lm_head.weight", np.ascontiguousarray(host(params["output"]).T)


def hf_tensors_from_params(params, cfg: LlamaConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """llama_jax params -> HF-named tensors (all at once; `iter_hf_tensors` for one at a time)."""
    return dict(iter_hf_tensors(params, cfg, dtype))


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise ConversionError(f"{path}: missing")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def from_hf(path: str, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Reads a Hugging Face Llama directory (`config.json` + `model.safetensors` or a
    sharded `model.safetensors.index.json`). Returns (LlamaConfig, params) with params as
    host numpy arrays in the config's `param_dtype`; place them on a mesh with
    `llama_jax.sharding.shard_params`. `config_overrides` set LlamaConfig fields that HF
    does not describe (dtype, remat_policy, scan_layers, ...)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"{cfg_path}: missing (not a Hugging Face model directory?)")
    hf = _read_json(cfg_path)
    cfg = config_from_hf(hf, source=cfg_path, **config_overrides)
    reader = _SafetensorsReader(path)
    has_head = "lm_head.weight" in reader.weight_map
    if not has_head and not hf.get("tie_word_embeddings"):
        raise ConversionError(f"{path}: tensor 'lm_head.weight' is missing")
    return cfg, params_from_hf_tensors(reader.get, cfg, has_lm_head=has_head)  # tied: an untied copy


def hf_config(cfg: LlamaConfig, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "initializer_range": 0.02, "torch_dtype": dtype, "dtype": dtype,
    }


HF_SHARD_SIZE = "5GB"  # transformers 4's save_pretrained default; the Hub takes no file over 50GB


def parse_size(text: str | int) -> int:
    """Bytes of "5GB", "500MB", "2GiB" or a plain number (`--max_shard_size`)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = str(text).strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        size = float(number) * units[t[len(number):].strip()]
    except (ValueError, KeyError):
        raise ConversionError(f"--max_shard_size={text}: not a size (e.g. 5GB, 500MB, 2GiB or bytes)") from None
    if not math.isfinite(size) or size < 1:
        raise ConversionError(f"--max_shard_size={text}: must be at least one byte")
    return int(size)


def _hf_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every HF tensor, in `iter_hf_tensors`' order."""
    top = [("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim))]
    for i in range(cfg.n_layers):
        top += [(f"model.layers.{i}.{name}", shape) for name, shape, _, _ in _layout(cfg).values()]
    return top + [("model.norm.weight", (cfg.dim,)), ("lm_head.weight", (cfg.vocab_size, cfg.dim))]


def hf_files(cfg: LlamaConfig, dtype: str = "float32", max_shard_size: str | int = HF_SHARD_SIZE) -> list[list[str]]:
    """The tensor names of each safetensors file of an HF export, in order: files of at
    most `max_shard_size` bytes (a tensor larger than that gets a file of its own)."""
    limit, itemsize = parse_size(max_shard_size), np.dtype(DTYPES[dtype]).itemsize
    files: list[list[str]] = [[]]
    size = 0
    for name, shape in _hf_shapes(cfg):
        n = math.prod(shape) * itemsize
        if files[-1] and size + n > limit:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    return files


def to_hf(params, cfg: LlamaConfig, dst: str, tokenizer_path: str | None = None, dtype: str = "float32",
          max_shard_size: str | int = HF_SHARD_SIZE) -> None:
    """Writes a Hugging Face Llama directory (new or empty; nothing is left of a failed
    write): config.json, the weights in `dtype` as `model.safetensors`, or, larger than
    `max_shard_size`, as `model-0000N-of-0000M.safetensors` files with the
    `model.safetensors.index.json` that `save_pretrained` writes; and when given the
    SentencePiece tokenizer.model with a tokenizer.json that tokenizes as SentencePiece
    does and a PreTrainedTokenizerFast config with the Llama 2-Chat chat template (without
    transformers: a LlamaTokenizer config and no tokenizer.json). One file's tensors are
    held at a time, with progress on stderr."""
    from safetensors.numpy import save_file

    from llama_jax.workdir import staged_directory

    files = hf_files(cfg, dtype, max_shard_size)
    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    with staged_directory(dst, ConversionError) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, dtype), f, indent=1)
        tensors = iter_hf_tensors(params, cfg, np.dtype(DTYPES[dtype]))
        progress, done, weight_map, total = _progress(sum(map(len, files)), "tensors written"), 0, {}, 0
        for file, members in zip(names, files):
            chunk = {}
            for expected in members:
                name, chunk[expected] = next(tensors)
                assert name == expected, (name, expected)
                total += chunk[expected].nbytes
                weight_map[expected] = file
                done += 1
                progress.update(done)
            save_file(chunk, os.path.join(tmp, file), metadata={"format": "pt"})
            del chunk
        progress.close()
        if len(files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        if tokenizer_path:
            shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
            settings = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
                        "model_max_length": cfg.max_seq_len, "chat_template": CHAT_TEMPLATE}
            config_path = os.path.join(tmp, "tokenizer_config.json")
            with open(config_path, "w") as f:
                json.dump(settings, f, indent=1)
            if _write_tokenizer_json(tmp, dst):  # converted with the config above; then read by the generic class:
                # transformers 5's LlamaTokenizer rebuilds its own pipeline (and drops leading spaces), the generic
                # fast tokenizer reads tokenizer.json as written, in transformers 4 and 5
                with open(config_path, "w") as f:
                    json.dump({**settings, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)


# Meta's Llama 2-Chat format (`tokenizer.encode_dialog`) as a Jinja chat template, for
# transformers' apply_chat_template: the system message folded into the first user turn,
# each completed exchange "<s>[INST] user [/INST] answer </s>", the open turn "<s>[INST] user [/INST]".
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set text = m['content'] -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + text -%}"
    "{%- endif -%}"
    "{{ bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}")


def _write_tokenizer_json(directory: str, shown: str) -> bool:
    """tokenizer.json beside tokenizer.model, laid out as Meta's Llama-2-hf release
    (normalizer: prepend "▁", spaces to "▁"; no pre-tokenizer), so that transformers'
    fast tokenizer gives SentencePiece's ids: converted from tokenizer.model alone it
    drops a text's leading spaces (" x", "  a"). Needs transformers (it converts the
    vocabulary); without it a note says what is missing."""
    try:
        from tokenizers import decoders, normalizers
        from transformers import AutoTokenizer
    except ImportError:
        print("note: no tokenizer.json written (it needs transformers and tokenizers); transformers will convert "
              "tokenizer.model itself, which drops a text's leading spaces", file=sys.stderr)
        return False
    backend = AutoTokenizer.from_pretrained(directory).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.save(os.path.join(directory, "tokenizer.json"))
    _check_tokenizer_json(directory, backend, shown)
    return True


# texts whose ids tell Llama 2's tokenizer settings from others: spaces (leading, repeated, trailing),
# digits, characters outside a small vocabulary (byte fallback), Unicode that normalisation changes
TOKENIZER_PROBES = (" leading space", "two  spaces", "trailing space ", "Hello, world!", "digits 12345 and 3.14",
                    "caf\u00e9 na\u00efve \u00bd \ufb01 \u2460", "\u65e5\u672c\u8a9e \U0001f642", "tab\there",
                    "new\nline", "UPPER lower MiXeD", "x", "[INST] tags [/INST]")


def _check_tokenizer_json(directory: str, backend, shown: str) -> None:
    """Warns when the written tokenizer.json (Llama 2's layout) gives other ids than
    SentencePiece for the probe texts: a tokenizer.model trained with other settings
    (another normalisation, no byte fallback, unigram) that the layout does not reproduce.
    `shown`: the directory named in the warning (the export's, not its staging one)."""
    sp = Tokenizer(os.path.join(directory, "tokenizer.model"))
    wrong = [(t, sp.encode(t), backend.encode(t, add_special_tokens=False).ids) for t in TOKENIZER_PROBES]
    wrong = [w for w in wrong if w[1] != w[2]]
    if wrong:
        text, mine, theirs = wrong[0]
        differ = sp.llama_differences()
        print(f"warning: {os.path.join(shown, 'tokenizer.json')}: transformers' tokenizer gives other ids than "
              f"SentencePiece for {len(wrong)} of {len(TOKENIZER_PROBES)} probe texts (e.g. {text!r}: {theirs} "
              f"against {mine}). tokenizer.model was trained with "
              + (f"settings other than Llama 2's ({', '.join(differ)})" if differ else "a layout tokenizer.json "
                 "does not reproduce")
              + ": tokenize with SentencePiece (tokenizer.model), or train the tokenizer with Llama 2's settings "
              "(python -m llama_jax.tokenizer train)", file=sys.stderr)


# ----------------------------------------------------------------------------------
# Meta (consolidated.NN.pth + params.json)
# ----------------------------------------------------------------------------------

# HF name (layer part after "model.layers.{i}.") -> (Meta name, model-parallel split dim or None)
_META_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_META_TOP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}


def _meta_name(hf_name: str) -> tuple[str, int | None]:
    if hf_name in _META_TOP:
        return _META_TOP[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    name, dim = _META_LAYER[rest]
    return f"layers.{i}.{name}", dim


def config_from_meta(params_json: dict, vocab_size: int, ffn_hidden_dim: int, source: str,
                     **overrides) -> LlamaConfig:
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope"}
    unknown = sorted(set(params_json) - known)
    if unknown:
        raise ConversionError(f"{source}: unsupported fields {unknown}")
    if params_json.get("use_scaled_rope"):
        raise ConversionError(f"{source}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    fields = {k: v for k, v in params_json.items() if k not in ("max_batch_size", "use_scaled_rope")}
    fields["vocab_size"] = vocab_size  # Llama 2's params.json says -1
    try:
        cfg = LlamaConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from None
    if cfg.hidden_dim != ffn_hidden_dim:
        raise ConversionError(f"{source}: multiple_of/ffn_dim_multiplier give an FFN width of {cfg.hidden_dim}, "
                              f"but the checkpoint's w1 has {ffn_hidden_dim} rows")
    return cfg


def from_meta(path: str, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Reads Meta's layout: `params.json` and `consolidated.NN.pth` model-parallel shards
    (merged by concatenating along each tensor's split dimension; norms replicated), with
    `torch.load(weights_only=True)`, which never runs code from the file."""
    try:
        import torch
    except ImportError:
        raise ConversionError("reading Meta checkpoints needs PyTorch: pip install torch") from None
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a directory")
    params_json = _read_json(os.path.join(path, "params.json"))
    shards = sorted(f for f in os.listdir(path) if f.startswith("consolidated.") and f.endswith(".pth"))
    if not shards:
        raise ConversionError(f"{path}: no consolidated.NN.pth files")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        missing = sorted(set(expected) - set(shards))
        raise ConversionError(f"{path}: model-parallel shards {shards} are not numbered 00..{len(shards) - 1:02d}"
                              f"{f' (missing {missing})' if missing else ''}")
    states = []
    for name in shards:
        try:
            states.append(torch.load(os.path.join(path, name), map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch raises many types for bad files
            raise ConversionError(f"{os.path.join(path, name)}: cannot load ({e})") from None

    def parts(meta_name: str) -> list:
        for name, state in zip(shards, states):
            if meta_name not in state:
                raise ConversionError(f"{os.path.join(path, name)}: tensor {meta_name!r} is missing")
        return [state[meta_name] for state in states]

    def merged(meta_name: str, dim: int | None) -> np.ndarray:
        pieces = [t.float().numpy() for t in parts(meta_name)]
        return pieces[0] if dim is None or len(pieces) == 1 else np.concatenate(pieces, axis=dim)

    vocab = parts("tok_embeddings.weight")[0].shape[0]  # split on columns: every shard has all the rows
    width = sum(t.shape[1] for t in parts("tok_embeddings.weight"))
    if isinstance(params_json.get("dim"), int) and width < params_json["dim"]:  # the last shards are gone
        raise ConversionError(f"{path}: the {len(shards)} consolidated.NN.pth files hold {width} of the "
                              f"{params_json['dim']} embedding columns (params.json dim): model-parallel shards are "
                              f"missing (each holds {width // len(shards)} columns: "
                              f"{params_json['dim'] // max(1, width // len(shards))} shards in all?)")
    ffn = sum(t.shape[0] for t in parts("layers.0.feed_forward.w1.weight"))  # split on rows
    cfg = config_from_meta(params_json, vocab, ffn, os.path.join(path, "params.json"), **config_overrides)

    def get(hf_name: str, shape):
        meta_name, dim = _meta_name(hf_name)
        w = merged(meta_name, dim)
        if w.shape != tuple(shape):
            raise ConversionError(f"{path}: tensor {meta_name!r} merges to shape {w.shape}, params.json implies "
                                  f"{tuple(shape)}")
        if meta_name.endswith("attention.wq.weight"):
            w = permute_rotary(w, cfg.n_heads)  # Meta's interleaved RoPE rows -> rotate-half
        elif meta_name.endswith("attention.wk.weight"):
            w = permute_rotary(w, cfg.kv_heads)
        return w

    return cfg, params_from_hf_tensors(get, cfg)


# (multiple_of, ffn_dim_multiplier) of Meta's released params.json files: Llama 2 7B / 13B,
# Code Llama 34B and Llama 2 70B, Llama 3 8B
_META_FFN = ((256, None), (256, 1.0), (4096, 1.3), (1024, 1.3))


def meta_ffn(cfg: LlamaConfig) -> tuple[int, float | None]:
    """`multiple_of` and `ffn_dim_multiplier` that give the model's FFN width by Meta's
    formula: its own, else those of a released Meta model (an HF import records only the
    width: HF's 70B, 28,672, is Meta's 4096 / 1.3), else a multiplier found for it."""
    width = cfg.hidden_dim
    base = int(2 * 4 * cfg.dim / 3)
    found = [(m, f) for m, f in ((cfg.multiple_of, cfg.ffn_dim_multiplier), *_META_FFN)
             if meta_ffn_hidden_dim(cfg.dim, m, f) == width]
    if not found:  # a power of two dividing the width, as Meta's are, and the least 6-digit multiplier
        multiple = min(width & -width, 4096)
        f = math.ceil(width / base * 1e6) / 1e6
        found = [(multiple, f)] if meta_ffn_hidden_dim(cfg.dim, multiple, f) == width else []
    if not found:
        raise ConversionError(f"FFN width {width} is not expressible in Meta's params.json (multiple_of / "
                              "ffn_dim_multiplier); export to Hugging Face instead")
    return found[0]


def check_meta_export(cfg: LlamaConfig, num_shards: int) -> tuple[int, float | None]:
    """The params.json FFN fields of `cfg` in Meta's layout, or a ConversionError if it
    cannot be written there in `num_shards` model-parallel shards (from the config alone:
    checked before a large model is read)."""
    if num_shards < 1:
        raise ConversionError(f"--num_shards={num_shards}: must be at least 1")
    try:
        import torch  # noqa: F401  (Meta's shards are torch files)
    except ImportError:
        raise ConversionError("writing Meta checkpoints needs PyTorch: pip install torch") from None
    fields = meta_ffn(cfg)
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads), ("dim", cfg.dim),
                    ("vocab_size", cfg.vocab_size), ("FFN width", cfg.hidden_dim)):
        if n % num_shards:
            raise ConversionError(f"{what}={n} cannot be split into {num_shards} model-parallel shards")
    return fields


def to_meta(params, cfg: LlamaConfig, dst: str, num_shards: int = 1, tokenizer_path: str | None = None,
            dtype: str = "float32") -> None:
    """Writes Meta's layout (to a new or empty directory; nothing is left of a failed
    write): params.json and `num_shards` consolidated.NN.pth files in `dtype`, split the
    way Meta's model parallelism splits them."""
    import torch

    from llama_jax.workdir import staged_directory

    multiple_of, ffn_dim_multiplier = check_meta_export(cfg, num_shards)
    n_tensors = len(_hf_shapes(cfg))
    progress = _progress(n_tensors * num_shards, "tensors written")
    with staged_directory(dst, ConversionError) as tmp:
        for i in range(num_shards):  # one shard's tensors at a time (each tensor made again for each shard)
            shard = {}
            for n, (hf_name, w) in enumerate(iter_hf_tensors(params, cfg)):
                meta_name, dim = _meta_name(hf_name)
                if meta_name.endswith("attention.wq.weight"):
                    w = unpermute_rotary(w, cfg.n_heads)
                elif meta_name.endswith("attention.wk.weight"):
                    w = unpermute_rotary(w, cfg.kv_heads)
                piece = w if dim is None else np.split(w, num_shards, axis=dim)[i]
                # a copy: torch wants a writable array, and bfloat16 comes from float32 (numpy has no bfloat16
                # torch reads); contiguous, so that torch.save writes the piece and not the whole tensor
                shard[meta_name] = torch.from_numpy(np.array(piece, np.float32)).to(getattr(torch, dtype))
                progress.update(i * n_tensors + n + 1)
            torch.save(shard, os.path.join(tmp, f"consolidated.{i:02d}.pth"))
            del shard
        progress.close()
        # Llama 2's loader builds its ModelArgs(**params) and has no rope_theta field (Code Llama added it)
        params_json = {"dim": cfg.dim, "multiple_of": multiple_of, "n_heads": cfg.n_heads,
                       "n_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size}
        if cfg.rope_theta != 10000.0:
            params_json["rope_theta"] = cfg.rope_theta
        if cfg.n_kv_heads is not None:
            params_json["n_kv_heads"] = cfg.n_kv_heads
        if ffn_dim_multiplier is not None:
            params_json["ffn_dim_multiplier"] = ffn_dim_multiplier
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params_json, f)
        if tokenizer_path:
            shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
            pieces = Tokenizer(tokenizer_path).vocab_size
            if pieces != cfg.vocab_size:
                print(f"warning: {dst}: params.json vocab_size {cfg.vocab_size}, but tokenizer.model has {pieces} "
                      "pieces: Meta's loader (Llama.build) takes the vocabulary size from the tokenizer and will "
                      "not load these weights (llama_jax's --from=meta and Hugging Face's conversion read them)",
                      file=sys.stderr)


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m llama_jax.convert",
        description="Import Meta / Hugging Face Llama checkpoints into llama_jax checkpoints, or export them.",
        epilog="examples:\n  python -m llama_jax.convert --from=meta --src=llama-2-7b --dst=ckpt/7b\n"
               "  python -m llama_jax.convert --to=hf --src=runs/tiny --dst=hf/tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = ap.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="src_format", choices=["meta", "hf"], help="import from this format")
    direction.add_argument("--to", dest="dst_format", choices=["meta", "hf"], help="export to this format")
    ap.add_argument("--src", required=True, help="source directory")
    ap.add_argument("--dst", required=True, help="destination directory")
    ap.add_argument("--num_shards", type=int, default=None, help="model-parallel shards for --to=meta (default 1)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="weights' dtype in an export (default float32; Meta's and HF's Llama 2 releases are "
                         "bfloat16 / float16). Imports keep llama_jax's float32 parameters")
    ap.add_argument("--max_shard_size", default=None,
                    help=f"largest safetensors file of --to=hf, e.g. 10GB or 500MB (default {HF_SHARD_SIZE}; a "
                         "larger model is split into model-0000N-of-0000M.safetensors files with an index, as "
                         "save_pretrained splits them)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.model to bundle (default: the source's)")
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.convert")
    from llama_jax.checkpoint import quiet_orbax

    quiet_orbax()  # a damaged checkpoint: one error line, not Orbax's and TensorStore's logs
    from llama_jax import checkpoint as ckpt
    from llama_jax.workdir import require_empty

    if args.num_shards is not None and args.dst_format != "meta":
        ap.error("--num_shards is for --to=meta")
    if args.max_shard_size is not None and args.dst_format != "hf":
        ap.error("--max_shard_size is for --to=hf")
    if args.dtype is not None and not args.dst_format:
        ap.error("--dtype is for exports (--to); an import keeps float32 parameters, as training needs")
    try:
        if args.tokenizer and not os.path.isfile(args.tokenizer):
            raise ConversionError(f"--tokenizer {args.tokenizer}: no such file")
        shard_size = parse_size(args.max_shard_size or HF_SHARD_SIZE)
        require_empty(args.dst, ConversionError)  # checked again when writing; here before reading
        if args.src_format:
            cfg, params = (from_meta if args.src_format == "meta" else from_hf)(args.src)
            tok = args.tokenizer or os.path.join(args.src, "tokenizer.model")
            parent = os.path.join(os.path.dirname(os.path.abspath(args.src)), "tokenizer.model")
            if not os.path.exists(tok) and args.src_format == "meta" and os.path.exists(parent):
                tok = parent  # Meta's downloads keep it beside the model directories
                print(f"tokenizer: {parent} (the one beside {args.src}, as in Meta's downloads)")
            elif not os.path.exists(tok):
                print(f"warning: no tokenizer.model in {args.src}; the checkpoint has none, and generate, chat and "
                      "evaluate will need one: convert again with --tokenizer=PATH", file=sys.stderr)
            meta = {"model": cfg.to_dict(), "heads": ["lm"], "source": f"{args.src_format}:{os.path.abspath(args.src)}"}
            if os.path.exists(tok):
                tk = Tokenizer(tok)
                tk.check_fits(cfg.vocab_size, "checkpoint")
                meta["tokenizer"] = tk.identity()
            print(f"writing {args.dst} ({cfg.num_params():,} parameters)", file=sys.stderr, flush=True)
            ckpt.save_params(args.dst, params, meta, step=0, tokenizer_path=tok if os.path.exists(tok) else None)
            print(f"imported {args.src_format} {args.src} ({cfg.num_params():,} parameters) -> {args.dst}")
        else:
            step, meta = ckpt.read_meta(args.src)  # everything is checked from the config before the model is read
            cfg, heads = ckpt.model_config(meta), meta.get("heads", ["lm"])
            if "lm" not in heads:
                raise ConversionError(f"{args.src}: has no LM head (heads {list(heads)}); only language models export "
                                      "(a reward model's score head has a bias, which Hugging Face's "
                                      "LlamaForSequenceClassification lacks; use it from llama_jax)")
            if set(heads) - {"lm"}:  # PPO's value head: Llama's layouts have no place for it
                print(f"note: {args.src}'s {', '.join(h for h in heads if h != 'lm')} head is not exported (the "
                      f"{args.dst_format} layout holds a language model only)", file=sys.stderr)
            beside = os.path.join(args.src, "tokenizer.model")
            tok = args.tokenizer or (beside if os.path.exists(beside) else None)
            if tok:
                bundled = Tokenizer(tok)
                bundled.check_fits(cfg.vocab_size, f"{args.src} checkpoint")
                trained = (meta.get("tokenizer") or {}).get("sha256")
                if trained and bundled.identity()["sha256"] != trained:  # its ids would mean other words
                    mine = bundled.identity()["sha256"][:12]
                    named = f"--tokenizer {tok}" if args.tokenizer else f"{tok} (the checkpoint's own tokenizer.model)"
                    raise ConversionError(f"{named}: not the tokenizer {args.src} was trained with (sha256 "
                                          f"{mine}..., the checkpoint's {trained[:12]}...)")
            else:
                print(f"note: no tokenizer.model in {args.src}: the export has no tokenizer files; bundle one with "
                      "--tokenizer=PATH", file=sys.stderr)
            num_shards = 1 if args.num_shards is None else args.num_shards
            if args.dst_format == "meta":
                check_meta_export(cfg, num_shards)
            print(f"reading {args.src} checkpoint {step} ({cfg.num_params():,} parameters)", file=sys.stderr,
                  flush=True)
            cfg, params, _, _ = ckpt.load_model(args.src, step)  # that step, though the run may have saved another
            dtype = args.dtype or "float32"
            if args.dst_format == "hf":
                to_hf(params, cfg, args.dst, tok, dtype, shard_size)
            else:
                to_meta(params, cfg, args.dst, num_shards, tok, dtype)
            print(f"exported {args.src} -> {args.dst_format} {args.dst}")
    except (ConversionError, ckpt.CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
