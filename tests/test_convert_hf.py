"""Numerical parity with Hugging Face `transformers` (PyTorch, CPU) after `from_hf`."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import run

from llama_jax import sharding
from llama_jax.convert import ConversionError, config_from_hf, from_hf
from llama_jax.model import KVCache, Llama

# GQA (n_kv_heads < n_heads) and odd sizes everywhere.
HF_KW = dict(vocab_size=131, hidden_size=60, intermediate_size=97, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)


def make_hf(tmp_path, seed=0, shard=False, **overrides):
    """A random tiny LlamaForCausalLM saved to tmp_path/hf; returns (model, path)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**HF_KW, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights and random norm scales: every path matters
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = str(tmp_path / "hf")
    model.save_pretrained(path, max_shard_size="40KB" if shard else "10GB")
    return model, path


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(toks))).logits.float().numpy()


@pytest.mark.parametrize("shard", [False, True])
def test_logits_match_transformers(tmp_path, shard):
    hf_model, path = make_hf(tmp_path, shard=shard)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == shard
    cfg, params = from_hf(path)
    assert (cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim, cfg.vocab_size) == (60, 6, 2, 97, 131)
    toks = np.random.default_rng(0).integers(0, 131, size=(2, 17))
    ours = np.asarray(run(Llama(cfg), params, toks))
    theirs = hf_logits(hf_model, toks)
    assert np.abs(theirs).max() > 0.5  # a meaningful comparison, not two near-zero outputs
    assert np.abs(ours - theirs).max() < 1e-4


def test_converted_params_decode_with_cache_and_shard(tmp_path):
    hf_model, path = make_hf(tmp_path, seed=1)
    cfg, params = from_hf(path)
    toks = np.random.default_rng(1).integers(0, 131, size=(2, 9))
    theirs = hf_logits(hf_model, toks)
    model = Llama(cfg)
    out, cache = run(model, params, toks[:, :6], cache=KVCache.init(cfg, 2, 12))
    outs = [out]
    for i in range(6, 9):
        out, cache = run(model, params, toks[:, i:i + 1], cache=cache)
        outs.append(out)
    assert np.abs(np.concatenate(outs, 1) - theirs).max() < 1e-4

    mesh = sharding.make_mesh(2, 2, 2)
    sharded = sharding.shard_params(params, model, mesh, sharding.DEFAULT_RULES)
    assert sharded["layers"]["attention"]["wq"].addressable_shards[0].data.shape == (3, 30, 3, 10)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, toks)
    assert np.abs(np.asarray(logits) - theirs).max() < 1e-4


def test_tied_embeddings_import_as_an_untied_copy(tmp_path):
    hf_model, path = make_hf(tmp_path, seed=2, tie_word_embeddings=True)
    cfg, params = from_hf(path)
    np.testing.assert_array_equal(params["output"], params["tok_embeddings"]["embedding"].T)
    toks = np.arange(10)[None] % 131
    assert np.abs(np.asarray(run(Llama(cfg), params, toks)) - hf_logits(hf_model, toks)).max() < 1e-4


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    hf_model, path = make_hf(tmp_path, seed=3)
    hf_model.to(torch.bfloat16).save_pretrained(path)
    cfg, params = from_hf(path)
    assert params["layers"]["attention"]["wq"].dtype == np.float32
    expected = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["layers"]["attention"]["wq"][1].reshape(60, 60).T, expected)


def test_unsupported_configs_are_clear_errors():
    base = {**HF_KW, "model_type": "llama"}
    for change, needle in [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act: 'gelu' is not supported"),
        ({"attention_bias": True}, "biases are not supported"),
        ({"model_type": "mistral"}, "model_type: 'mistral' is not supported"),
        ({"head_dim": 16}, "head_dim: 16 != hidden_size/num_attention_heads = 10"),
        ({"num_attention_heads": 7}, "dim=60 is not divisible by n_heads=7"),
    ]:
        with pytest.raises(ConversionError, match=needle):
            config_from_hf({**base, **change}, source="x/config.json")
    no_vocab = {k: v for k, v in base.items() if k != "vocab_size"}
    with pytest.raises(ConversionError, match="x/config.json: vocab_size: missing"):
        config_from_hf(no_vocab, source="x/config.json")
    with pytest.raises(ConversionError, match="run/config.json: a llama_jax run's config.json, not a Hugging Face "
                       "model's: .* --to=hf --src=RUN"):  # a run given as --from=hf (it said "hidden_size: missing")
        config_from_hf({"stage": "pretrain", "model": {"dim": 48}, "seq_len": 64}, source="run/config.json")
    cfg = config_from_hf({**base, "rope_theta": 5e5})  # pre-v5 transformers layout
    assert cfg.rope_theta == 5e5 and cfg.norm_eps == 1e-5
    assert config_from_hf({**base, "rope_scaling": {"rope_type": "default"}}).rope_theta == 1e4  # plain RoPE


def test_broken_directories_are_clear_errors(tmp_path):
    _, path = make_hf(tmp_path, seed=4, shard=True)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**hf, "intermediate_size": 98}, f)
    shape_error = r"'model.layers.0.mlp.gate_proj.weight' has shape \(97, 60\), config.json implies \(98, 60\)"
    with pytest.raises(ConversionError, match=shape_error):
        from_hf(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    missing = index["weight_map"]["model.norm.weight"]
    os.remove(os.path.join(path, missing))
    with pytest.raises(ConversionError, match=f"{missing}: listed in the safetensors index but missing"):
        from_hf(path)
    other = next(f for f in index["weight_map"].values() if f != missing)  # an index naming the wrong file
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({**index, "weight_map": {k: other if v == missing else v for k, v in index["weight_map"].items()}}, f)
    with pytest.raises(ConversionError, match=f"{other}: cannot read tensor '.*', which model.safetensors.index"):
        from_hf(path)
    with pytest.raises(ConversionError, match="not a directory"):
        from_hf(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConversionError, match="config.json: missing"):
        from_hf(str(tmp_path / "empty"))
