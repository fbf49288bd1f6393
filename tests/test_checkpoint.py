"""Checkpoints: restore onto a different mesh, params-only export, init_from, and a
workdir of another model."""

import functools
import re

import jax
import ml_collections
import numpy as np
import optax
import pytest
from helpers import random_params

from llama_jax import checkpoint as ckpt
from llama_jax import sharding, train
from llama_jax.model import COMPUTE_ONLY_FIELDS, Llama, LlamaConfig

CFG = LlamaConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden_dim=72, max_seq_len=32)
RULES = sharding.DEFAULT_RULES
OPT = ml_collections.ConfigDict(dict(learning_rate=1e-2, schedule="cosine", warmup_steps=2, final_lr_fraction=0.1,
                                     b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0))
META = {"model": CFG.to_dict(), "heads": ["lm"], "tokenizer": {"sha256": "x"}}


def sharded_state(mesh):
    model = Llama(CFG)
    opt = train.make_optimizer(OPT, 10)
    params = random_params(CFG, std=0.1)
    param_sh = sharding.param_shardings_like(params, model, mesh, RULES)
    abstract = jax.eval_shape(lambda p: train.init_state(p, opt), params)
    state_sh = train.state_shardings(abstract, param_sh, mesh)
    state = jax.jit(lambda p: train.init_state(p, opt), out_shardings=state_sh)(jax.device_put(params, param_sh))
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return state, target


def leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def two_optimizer_steps(state):
    """`state` after 2 AdamW steps on made-up gradients (sin of the params: nonzero,
    different per leaf and step), sharded as it was: Adam's moments and count nonzero."""
    import jax.numpy as jnp

    opt = train.make_optimizer(OPT, 10)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)

    @functools.partial(jax.jit, out_shardings=shardings)
    def step(s, k):
        grads = jax.tree_util.tree_map(lambda p: jnp.sin(37.0 * p + k), s.params)
        updates, opt_state = opt.update(grads, s.opt_state, s.params)
        return s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates), opt_state=opt_state)

    return step(step(state, 1.0), 2.0)


def test_restore_onto_a_different_mesh(tmp_path):
    """A state 2 optimizer steps in (Adam's moments nonzero), saved fully sharded, reads
    back equal onto a tensor-parallel mesh and onto one device."""
    state, _ = sharded_state(sharding.make_mesh(1, 8, 1))  # saved fully sharded over fsdp=8
    state = two_optimizer_steps(state)
    adam = state.opt_state[1][0]
    assert int(adam.count) == 2 and int(state.step) == 2
    for moment in (adam.mu, adam.nu):
        assert all(float(np.abs(np.asarray(x)).min()) > 0 for x in jax.tree_util.tree_leaves(moment))
    saver = ckpt.Checkpointer(str(tmp_path), async_save=True)
    saver.save(5, state, {"pos": 3}, META)
    saver.wait()
    saver.close()

    mesh = sharding.make_mesh(2, 1, 4)  # restored with tensor parallelism instead
    _, target = sharded_state(mesh)
    loader = ckpt.Checkpointer(str(tmp_path))
    assert loader.latest_step() == 5
    restored, data_state, meta = loader.restore(5, target)
    loader.close()
    leaves_equal(restored, state)
    mu = restored.opt_state[1][0].mu["layers"]["attention"]["wq"]
    assert mu.sharding.spec == target.params["layers"]["attention"]["wq"].sharding.spec  # the moments like the params
    wq = restored.params["layers"]["attention"]["wq"]
    assert wq.sharding.spec == target.params["layers"]["attention"]["wq"].sharding.spec
    assert wq.addressable_shards[0].data.shape == (2, 40, 1, 10)  # heads split 4 ways now
    assert data_state == {"pos": 3} and meta["step"] == 5 and meta["model"]["dim"] == 40

    _, target = sharded_state(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))  # and onto one device
    loader = ckpt.Checkpointer(str(tmp_path))
    restored, _, _ = loader.restore(5, target)
    loader.close()
    leaves_equal(restored, state)
    assert restored.params["layers"]["attention"]["wq"].sharding.device_set == {jax.devices()[0]}


def test_export_and_load_params_for_inference(tmp_path):
    state, _ = sharded_state(sharding.make_mesh(2, 2, 2))
    run = tmp_path / "run"
    saver = ckpt.Checkpointer(str(run))
    saver.save(7, state, {}, META)
    saver.wait()
    saver.close()
    (run / "tokenizer.model").write_bytes(b"tok")
    assert ckpt.main(["export", f"--workdir={run}", f"--output={tmp_path / 'export'}"]) == 0
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == b"tok"
    step, meta = ckpt.read_meta(str(tmp_path / "export"))
    assert step == 7 and ckpt.model_config(meta) == CFG
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state.params)
    leaves_equal(ckpt.load_params(str(tmp_path / "export"), target), state.params)
    # The export holds no optimizer state.
    assert not (tmp_path / "export" / "checkpoints" / "7" / "train").exists()


def test_unusable_checkpoints_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint found"):
        ckpt.read_meta(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="missing: no such directory"):
        ckpt.read_meta(str(tmp_path / "missing"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="a_file: not a directory"):
        ckpt.read_meta(str(tmp_path / "a_file"))
    state, _ = sharded_state(sharding.make_mesh(8, 1, 1))
    saver = ckpt.Checkpointer(str(tmp_path / "run"))
    saver.save(1, state, {}, META)
    saver.wait()
    saver.close()
    step_dir = str(tmp_path / "run" / "checkpoints" / "1")  # one step of a run: the error says what to pass
    with pytest.raises(ckpt.CheckpointError, match=re.escape(
            f"one step of the run {tmp_path / 'run'}, which is what to pass (its latest step); for step 1: "
            f"python -m llama_jax.checkpoint export --workdir={tmp_path / 'run'} --step=1 --output=DIR")):
        ckpt.read_meta(step_dir)
    other = random_params(CFG.replace(n_layers=3))
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)
    with pytest.raises(ckpt.CheckpointError, match="cannot restore the params of checkpoint 1, unreadable or not of "
                                                  r"this model \(.+\)$"):
        ckpt.load_params(str(tmp_path / "run"), target)
    with pytest.raises(ckpt.CheckpointError, match=r"has no checkpoint 99; its checkpoints: \[1\]"):
        ckpt.read_meta(str(tmp_path / "run"), 99)
    saver = ckpt.Checkpointer(str(tmp_path / "run"))
    saver.save(2, state, {}, META)
    saver.wait()
    saver.close()
    with pytest.raises(ckpt.CheckpointError, match=r"its other checkpoints: \[1\] \(choose one by step"):
        ckpt.load_params(str(tmp_path / "run"), target)
    assert ckpt.main(["info", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such directory" in capsys.readouterr().err


def test_a_save_error_names_tensorstores_errno_even_when_the_middle_is_cut():
    from llama_jax.checkpoint import _first_line

    err = RuntimeError("Error writing " + "x" * 200 + ": File too large " + "y" * 300 + " [os_error_code='27']")
    line = _first_line(err)
    assert len(line) < 330 and line.endswith("[os_error_code='27'] [File too large]")
    assert _first_line(RuntimeError("File too large [os_error_code=27]")) == (
        "RuntimeError: File too large [os_error_code=27]")  # named already: not repeated


def test_a_checkpoint_from_before_a_new_model_field_still_matches():
    cfg = LlamaConfig.tiny()
    old = {k: v for k, v in cfg.to_dict().items() if k != "score_pooling"}  # written before the field existed
    assert ckpt.model_fields_differing(old, cfg.to_dict()) == []
    mean = LlamaConfig.tiny(score_pooling="mean").to_dict()
    assert ckpt.model_fields_differing(old, mean) == ["score_pooling"]
    assert ckpt.model_fields_differing({**old, "n_layers": 3}, cfg.to_dict()) == ["n_layers"]
    # numerics-only fields: the same weights, computed otherwise; a run resumes with them changed
    numerics = {**cfg.to_dict(), "mlp_backward": "manual", "remat_policy": "full", "n_layers": 3}
    assert ckpt.model_fields_differing(old, numerics) == ["mlp_backward", "n_layers", "remat_policy"]
    assert ckpt.model_fields_differing(old, numerics, ignore=COMPUTE_ONLY_FIELDS) == ["n_layers"]


def test_info_checks_the_params_it_describes_and_errors_are_one_line(tmp_path, capsys):
    """`checkpoint info` said "step N: {...}" of a checkpoint whose params were deleted or
    damaged; it now checks the item, its metadata and its shapes (without reading the
    arrays). A damaged checkpoint's export is one error line, not Orbax's and TensorStore's logs."""
    import os
    import shutil
    import subprocess
    import sys

    params = random_params(CFG)
    good = str(tmp_path / "good")
    ckpt.save_params(good, params, META)
    assert ckpt.main(["info", good]) == 0
    out = capsys.readouterr().out
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert f"params: {len(jax.tree_util.tree_leaves(params))} arrays, {n:,} values, shapes as the model's" in out
    gpu_run = str(tmp_path / "gpu_run")  # trained with cuDNN's attention, read on a CPU: the kernel shapes nothing
    ckpt.save_params(gpu_run, params, {**META, "model": CFG.replace(attention="cudnn", dtype="bfloat16").to_dict()})
    assert ckpt.main(["info", gpu_run]) == 0 and "shapes as the model's" in capsys.readouterr().out
    assert ckpt.load_model(gpu_run)[0].attention == "cudnn"
    broken = {}
    for name in ("deleted", "damaged", "other_model"):
        broken[name] = str(tmp_path / name)
        shutil.copytree(good, broken[name])
    step_dir = os.path.join(broken["deleted"], "checkpoints", "0")
    shutil.rmtree(os.path.join(step_dir, "params"))
    open(os.path.join(broken["damaged"], "checkpoints", "0", "params", "_METADATA"), "r+b").truncate(50)
    ckpt.save_params(broken["other_model"] + "2", random_params(CFG.replace(n_layers=3)), META)  # meta: 2 layers
    for name, words in (("deleted", f"{step_dir}: checkpoint 0 has no params (deleted or never written)"),
                        ("damaged", "checkpoints/0/params: unreadable (its metadata is missing or damaged)"),
                        ("other_model2", "checkpoints/0/params: not the model its meta names (['layers']")):
        path = broken.get(name, str(tmp_path / name))
        assert ckpt.main(["info", path]) == 2
        assert words in capsys.readouterr().err, name
    # a damaged array index: TensorStore's late callbacks printed tracebacks in about one export of four
    manifest = os.path.join(good, "checkpoints", "0", "params", "manifest.ocdbt")
    open(manifest, "r+b").truncate(10)
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for _ in range(3):
        out = subprocess.run([sys.executable, "-m", "llama_jax.checkpoint", "export", f"--workdir={good}",
                              f"--output={tmp_path / 'x'}"], env=e, capture_output=True, text=True, timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {good}: cannot restore the "
                                                                              "params"), out.stderr[-3000:]
        assert not os.path.exists(tmp_path / "x")


def test_processes_agree_on_the_checkpoint_they_resume_from(tmp_path, monkeypatch):
    """A checkpoint one process of a job cannot read (its own part of the arrays damaged)
    is unreadable for all: every process falls back to the same older step, and the
    warning names the process that failed (before, process 0 resumed the newest step and
    the other an older one, and the job died in mismatched collectives)."""
    from llama_jax import distributed

    state, target = sharded_state(sharding.make_mesh(1, 8, 1))
    saver = ckpt.Checkpointer(str(tmp_path), async_save=False)
    for step in (3, 6):
        saver.save(step, state, {"pos": step}, META)
    saver.wait()
    saver.close()
    calls = []

    def gather(value):  # this process is 0; process 1 cannot read step 6's arrays (its second read)
        calls.append(value)
        return [value, "OSError: checksum mismatch in ocdbt.process_1" if len(calls) == 2 else None]

    monkeypatch.setattr(distributed, "allgather_json", gather)
    said = []
    loader = ckpt.Checkpointer(str(tmp_path))
    step, restored, data_state, _ = loader.restore_latest(target, log=said.append)
    loader.close()
    assert step == 3 and data_state == {"pos": 3} and calls == [None] * 4  # both reads succeeded here
    assert said == [f"warning: checkpoint 6 in {tmp_path / 'checkpoints'} is unreadable (process 1: OSError: checksum "
                    "mismatch in ocdbt.process_1); falling back to checkpoint 3"]
    leaves_equal(restored, state)


def test_params_straight_from_init_save_and_load(tmp_path):
    """`Llama(cfg).init(...)["params"]` holds boxed (LogicallyPartitioned) arrays, which
    the model itself accepts: save_params unboxes them (it wrote them as they were, and
    loading then failed as 'unreadable or not of this model')."""
    import jax.numpy as jnp

    variables = Llama(CFG).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    ckpt.save_params(str(tmp_path / "m"), variables["params"], META)
    cfg, params, heads, _ = ckpt.load_model(str(tmp_path / "m"))
    assert cfg == CFG and heads == ("lm",)
    leaves_equal(params, jax.tree_util.tree_map(lambda x: x, variables["params"]))
