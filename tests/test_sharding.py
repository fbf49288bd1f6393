"""Sharding on a fake 8-device CPU mesh (see conftest.py): the same forward on several
mesh shapes equals the single-device result, and parameters really are split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, run
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.model import KVCache, Llama, LlamaConfig

# Divisible where the mesh needs it (dim by fsdp 8, heads and mlp by tensor 4), odd where
# it does not: vocab 101 and kv_heads 2 < tensor 4 exercise the replicate fallback.
CFG = LlamaConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden_dim=72, max_seq_len=32)
RULES = sharding.DEFAULT_RULES


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.fixture(scope="module")
def single_device():
    params = random_params(CFG, std=0.1)
    toks = jax.random.randint(jax.random.key(0), (8, 12), 0, CFG.vocab_size)
    return params, toks, np.asarray(run(Llama(CFG), params, toks))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_single_device(shape, single_device):
    params, toks, expected = single_device
    mesh = sharding.make_mesh(*shape)
    model = Llama(CFG)
    sharded = sharding.shard_params(params, model, mesh, RULES)
    data, fsdp, tensor = shape

    # Parameters really are split the way the rules say.
    wq = sharded["layers"]["attention"]["wq"]  # [L, D, H, Dh]: embed->fsdp, heads->tensor
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 40 // fsdp, 4 // tensor, 10)
    w1 = sharded["layers"]["feed_forward"]["w1"]
    assert w1.addressable_shards[0].data.shape == (2, 40 // fsdp, 72 // tensor)
    emb = sharded["tok_embeddings"]["embedding"]  # vocab 101 is indivisible: replicated
    assert emb.addressable_shards[0].data.shape == (101, 40 // fsdp)
    wk = sharded["layers"]["attention"]["wk"]  # 2 kv heads over tensor 4: replicated
    assert wk.addressable_shards[0].data.shape[2] == (2 // tensor if 2 % tensor == 0 else 2)
    if fsdp * tensor > 1:  # model-parallel meshes hold a fraction of the model per device
        total = sum(x.addressable_shards[0].data.size for x in jax.tree_util.tree_leaves(sharded))
        assert total < sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1.9

    batch_sh = sharding.batch_sharding(mesh, RULES, toks.shape)
    assert batch_sh.spec == P(("data", "fsdp"), None)
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
    with sharding.activate(mesh, RULES):
        logits = fwd(sharded, jax.device_put(toks, batch_sh))
    assert logits.addressable_shards[0].data.shape[0] == 8 // (data * fsdp)  # batch stays split
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def test_sharded_init_puts_params_on_their_shardings():
    mesh = sharding.make_mesh(1, 2, 4)
    params, shardings = sharding.init_params(Llama(CFG), jax.random.key(0), mesh, RULES)
    for p, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
        assert p.sharding == s
    assert params["output"].sharding.spec == P("fsdp", None)  # [embed, vocab=101]
    assert shardings["layers"]["feed_forward"]["w2"].spec == P(None, "tensor", "fsdp")
    assert float(jnp.std(params["layers"]["attention"]["wq"])) == pytest.approx(0.02, rel=0.1)
    # a fine-tuning stage's init: the loaded leaves are taken, and only the new head is initialised, with the
    # values (and shardings) a whole init gives it
    both = Llama(CFG, ("lm", "score"))
    whole, _ = sharding.init_params(both, jax.random.key(3), mesh, RULES)
    part, shardings = sharding.init_params(both, jax.random.key(3), mesh, RULES, given=params)
    assert jax.tree_util.tree_structure(part) == jax.tree_util.tree_structure(whole)
    assert part["output"] is params["output"]
    assert part["layers"]["attention"]["wq"] is params["layers"]["attention"]["wq"]
    np.testing.assert_array_equal(np.asarray(part["score_head"]["kernel"]), np.asarray(whole["score_head"]["kernel"]))
    assert part["score_head"]["kernel"].sharding == shardings["score_head"]["kernel"]
    other, _ = sharding.init_params(both, jax.random.key(3), mesh, RULES, given={**params, "output": jnp.zeros((3, 3))})
    np.testing.assert_array_equal(np.asarray(other["output"]), np.asarray(whole["output"]))  # of another shape: made


def test_sharded_cached_decoding_matches_forward(single_device):
    params, toks, expected = single_device
    mesh = sharding.make_mesh(2, 1, 4)
    model = Llama(CFG)
    sharded = sharding.shard_params(params, model, mesh, RULES)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c), donate_argnums=2)
    with sharding.activate(mesh, RULES):
        cache = KVCache.init(CFG, 8, 16)
        cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh, RULES))
        assert cache.k.addressable_shards[0].data.shape == (2, 8 // 2, 2, 16, 10)  # batch over data=2
        out, cache = step(sharded, toks[:, :9], cache)
        outs = [out]
        for i in range(9, 12):
            out, cache = step(sharded, toks[:, i:i + 1], cache)
            outs.append(out)
    np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs], 1), expected, atol=1e-5)


def test_params_of_another_shape_are_a_clear_error():
    mesh = sharding.make_mesh(8, 1, 1)
    other = random_params(CFG.replace(ffn_hidden_dim=64))
    del other["norm"]
    with pytest.raises(ValueError) as e:
        sharding.shard_params(other, Llama(CFG), mesh, RULES)
    msg = str(e.value)
    assert "missing ['norm/scale']" in msg
    assert "layers/feed_forward/w1 (2, 40, 64) (expected (2, 40, 72))" in msg


def test_mesh_from_config_dict():
    import ml_collections

    mesh = sharding.mesh_from_config(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}))
    assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_minus_one_takes_the_rest():
    assert sharding.mesh_shape(2, -1, 2) == (2, 2, 2)
    assert sharding.make_mesh(data=-1, fsdp=1, tensor=4).shape == {"data": 2, "fsdp": 1, "tensor": 4}


@pytest.mark.parametrize("kw,needle", [
    (dict(data=2, fsdp=2, tensor=4), "mesh data=2 x fsdp=2 x tensor=4 = 16 devices, but 8 devices are available"),
    (dict(data=-1, fsdp=-1, tensor=1), "only one mesh axis may be -1"),
    (dict(data=3, fsdp=-1, tensor=1), "8 devices are not divisible by the fixed axes' product 3"),
    (dict(data=0, fsdp=8, tensor=1), "mesh.data must be a positive integer or -1"),
])
def test_mesh_errors_name_the_numbers(kw, needle):
    with pytest.raises(sharding.MeshError) as e:
        sharding.make_mesh(**kw)
    assert needle in str(e.value)


def test_heads_not_divisible_by_tensor_is_an_error():
    cfg = LlamaConfig(dim=48, n_layers=1, n_heads=6, n_kv_heads=2, vocab_size=64)
    with pytest.raises(sharding.MeshError, match="n_heads=6 is not divisible by mesh tensor=4"):
        sharding.init_params(Llama(cfg), jax.random.key(0), sharding.make_mesh(2, 1, 4), RULES)


def test_bad_rules_are_an_error():
    with pytest.raises(sharding.MeshError, match="sharding rule #0 for 'heads' names unknown mesh axes \\['model'\\]"):
        sharding.normalize_rules([("heads", "model")])
    with pytest.raises(sharding.MeshError, match="names unknown mesh axes \\['fdsp'\\] \\(meant 'fsdp'\\?\\)"):
        sharding.normalize_rules([("embed", "fdsp")])
    with pytest.raises(sharding.MeshError, match="names unknown mesh axes"):
        sharding.normalize_rules([("heads", "model")])
    assert sharding.normalize_rules([["batch", ["data", "fsdp"]]]) == (("batch", ("data", "fsdp")),)
    # a misspelt logical name left `embed` unsharded and every weight whole on each device, silently
    misspelt = [("embd", "fsdp") if name == "embed" else (name, axes) for name, axes in RULES]
    with pytest.raises(sharding.MeshError, match="logical axis 'embd', which the model does not have \\(meant "
                       "'embed'\\?\\)"):
        sharding.normalize_rules(misspelt)
    with pytest.raises(sharding.MeshError, match="logical axis 'heads' has a rule already"):
        sharding.normalize_rules(RULES + (("heads", None),))
    with pytest.raises(sharding.MeshError, match="mesh.rules has no rule for \\['embed'\\]"):
        sharding.normalize_rules([r for r in RULES if r[0] != "embed"], complete=True)
    assert sharding.normalize_rules(RULES, complete=True) == RULES


def test_mesh_axes_that_do_not_divide_the_weights_are_named():
    """An `fsdp` that does not divide the model width replicates every weight (the rules
    fall back to replication per dimension): a note with the per-device size and the
    parameters; a small odd vocabulary (CFG's 101) is not worth one."""
    assert sharding.replication_note(Llama(CFG), sharding.make_mesh(1, 8, 1), RULES) is None
    assert sharding.replication_note(Llama(CFG.replace(n_kv_heads=4, vocab_size=104)), sharding.make_mesh(1, 2, 4),
                                     RULES) is None
    # fewer kv heads than `tensor` (70B's 8 on tensor=16): their projections are whole on every device
    assert "mesh tensor=4 does not divide 2 parameters' dimensions, e.g. layers/attention/wk (kv_heads 2)" in \
        sharding.replication_note(Llama(CFG.replace(vocab_size=104)), sharding.make_mesh(1, 2, 4), RULES)
    odd = CFG.replace(dim=36, n_heads=2, n_kv_heads=2)  # 36 over fsdp=8: no
    note = sharding.replication_note(Llama(odd), sharding.make_mesh(1, 8, 1), RULES)
    whole = sum(np.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(sharding.abstract_params(Llama(odd))))
    assert note.startswith(f"the parameters take {whole / 2**20:.2f} MiB per device, not the ")
    assert "mesh fsdp=8 does not divide" in note and "(embed 36)" in note


def test_gathering_for_generation_drops_fsdp_and_samples_the_same():
    """Sampling from an FSDP-sharded model (mesh.gather_for_generation): the copy holds the
    same values split over `tensor` only, and greedy decoding gives the same tokens as from
    the sharded params. A copy that would not fit in a device's memory is an error naming
    the field and the numbers."""
    from llama_jax.generate import generate

    assert sharding.without_fsdp((("embed", ("fsdp", "tensor")), ("batch", ("data", "fsdp")), ("mlp", "fsdp"))) == (
        ("embed", ("tensor",)), ("batch", ("data", "fsdp")), ("mlp", None))
    mesh, rules, model = sharding.make_mesh(1, 4, 2), sharding.DEFAULT_RULES, Llama(CFG)
    params = sharding.shard_params(random_params(CFG, std=0.15, seed=1), model, mesh, rules)
    specs = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(params)]
    assert any("fsdp" in s for s in specs)
    gather, gathered_rules = sharding.gather_for_generation(model, mesh, rules)
    gathered = gather(params)
    assert dict(gathered_rules)["batch"] == ("data", "fsdp") and dict(gathered_rules)["embed"] is None
    g_specs = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(gathered)]
    assert not any("fsdp" in s for s in g_specs) and any("tensor" in s for s in g_specs)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(gathered)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = [[5, 6, 7], [9, 3], [4], [8, 8, 8, 8]]
    sharded = generate(CFG, params, prompts, 8, mesh=mesh, rules=rules)
    whole = generate(CFG, gathered, prompts, 8, mesh=mesh, rules=gathered_rules)
    assert sharded.tokens == whole.tokens
    np.testing.assert_allclose(np.concatenate(sharded.logprobs), np.concatenate(whole.logprobs), atol=1e-5)
    per_device = sum(x.addressable_shards[0].data.size * 4 for x in jax.tree_util.tree_leaves(gathered))
    assert sharding.generation_rules(model, mesh, rules, memory_limit=per_device * 2) == gathered_rules
    with pytest.raises(sharding.MeshError, match=r"mesh.gather_for_generation: the gathered copy of the model takes "
                                                 r"0.0 GiB per device \(its parameters over tensor=2\), more than 60% "
                                                 r"of the device's 0.0 GiB; raise mesh.tensor"):
        sharding.generation_rules(model, mesh, rules, memory_limit=per_device)
    # a bfloat16 model's copy holds its weight matrices in bfloat16 (half the memory; the decode casts them to
    # it anyway): the same samples, and the memory check counts the smaller copy
    bf16 = Llama(CFG.replace(dtype="bfloat16"))
    gather16, _ = sharding.gather_for_generation(bf16, mesh, rules)
    copy16 = gather16(params)
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(copy16) if x.ndim >= 2} == {"bfloat16"}
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(copy16) if x.ndim < 2} == {"float32"}
    with_value = Llama(CFG.replace(dtype="bfloat16"), ("lm", "value"))  # a scalar head computes in float32: kept
    cast = sharding._for_generation(with_value)(random_params(CFG, heads=("lm", "value"), std=0.1, seed=2))
    assert cast["value_head"]["kernel"].dtype == jnp.float32 and cast["output"].dtype == jnp.bfloat16
    assert generate(bf16.config, params, prompts, 8, mesh=mesh, rules=rules).tokens == \
        generate(bf16.config, copy16, prompts, 8, mesh=mesh, rules=gathered_rules).tokens
    half = sum(x.addressable_shards[0].data.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(copy16))
    assert half < 0.6 * per_device
    sharding.generation_rules(bf16, mesh, rules, memory_limit=int(half / 0.6) + 1)  # fits: no error


def test_a_stage_samples_from_a_copy_loaded_in_the_compute_dtype(tmp_path, tokenizer_path):
    """`stages.sampling_model` with mesh.gather_for_generation (rejection sampling, GAtt,
    distillation): a bfloat16 model stored in float32 is loaded whole on each FSDP group in
    bfloat16 (cast as it is read), and samples as the float32 weights do."""
    from llama_jax import checkpoint as ckpt
    from llama_jax import configs, stages
    from llama_jax import tokenizer as tk
    from llama_jax.generate import generate

    cfg = CFG.replace(vocab_size=tk.Tokenizer(tokenizer_path).vocab_size, dtype="bfloat16")
    params = random_params(cfg, std=0.1, seed=4)
    ckpt.save_params(str(tmp_path / "m"), params, {"model": cfg.to_dict(), "heads": ["lm"]},
                     tokenizer_path=tokenizer_path)
    config = configs.chat_config()
    config.mesh.fsdp, config.mesh.tensor, config.mesh.gather_for_generation = 4, 2, True
    got_cfg, got, _, mesh, rules = stages.sampling_model(config, str(tmp_path / "m"))
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(got)} == {"bfloat16"}
    assert dict(rules)["embed"] is None and not any("fsdp" in str(x.sharding.spec)
                                                     for x in jax.tree_util.tree_leaves(got))
    prompts = [[5, 6, 7], [9, 3]]
    assert generate(got_cfg, got, prompts, 6, mesh=mesh, rules=rules).tokens == \
        generate(cfg, params, prompts, 6).tokens
