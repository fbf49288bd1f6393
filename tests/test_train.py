import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import random_params

from llama_jax import sharding, train
from llama_jax.data.pipeline import lm_example
from llama_jax.model import Llama, LlamaConfig
from llama_jax.objectives import next_token

CFG = LlamaConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden_dim=72, max_seq_len=32)


def opt_cfg(**kw):
    base = dict(learning_rate=1e-2, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1, b1=0.9, b2=0.95,
                eps=1e-5, weight_decay=0.1, clip_norm=1.0)
    return ml_collections.ConfigDict({**base, **kw})


def make_batch(b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        toks = rng.integers(3, CFG.vocab_size, t)
        seg = np.array([1] * (t // 2) + [2] * (t - t // 2))
        pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
        rows.append(lm_example(toks, rng.random(t) > 0.3, seg, pos))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def apply_fn(params, tokens, positions, segment_ids):
    return Llama(CFG).apply({"params": params}, tokens, positions, segment_ids)


def test_schedule_warms_up_then_decays_to_ten_percent():
    sched = train.learning_rate_schedule(opt_cfg(), total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-3)
    assert float(sched(10)) == pytest.approx(1e-2)
    assert float(sched(60)) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5), rel=1e-4)  # half-way down the cosine
    assert float(sched(110)) == pytest.approx(1e-3)
    const = train.learning_rate_schedule(opt_cfg(schedule="constant", warmup_steps=0), 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="optimizer.schedule: 'linear'"):
        train.learning_rate_schedule(opt_cfg(schedule="linear"), 10)


def test_a_run_inside_its_warmup_is_warned():
    c = ml_collections.ConfigDict({"optimizer": opt_cfg(warmup_steps=2000), "total_steps": 1000})
    assert train.warmup_warning(c) == ("warning: config.optimizer.warmup_steps 2000 >= config.total_steps 1000: the "
                                       "learning rate never reaches its peak (0.01)")
    c.total_steps = 2001
    assert train.warmup_warning(c) == ""


def test_clip_norm_zero_is_no_clipping():
    """clip_by_global_norm(0) would zero every gradient; 0 means no clipping, with the
    same optimizer-state layout as a clipped run (a checkpoint resumes either way)."""
    params = random_params(CFG)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 10.0), params)
    cfg = opt_cfg(warmup_steps=0, schedule="constant", weight_decay=0.0)
    plain = train.make_optimizer(cfg, 10)
    cfg.clip_norm = 0.0
    unclipped = train.make_optimizer(cfg, 10)
    assert (jax.tree_util.tree_structure(plain.init(params)) == jax.tree_util.tree_structure(unclipped.init(params)))
    step, _ = unclipped.update(grads, unclipped.init(params), params)
    # Adam's first step is lr * sign(gradient) everywhere; zeroed gradients would give no step
    assert float(jnp.abs(step["output"]).min()) == pytest.approx(1e-2, rel=1e-3)
    cfg.clip_norm = -1.0
    with pytest.raises(ValueError, match="clip_norm -1.0 is negative"):
        train.make_optimizer(cfg, 10)
    for field, value, what in (("b1", 1.0, r"in \[0, 1\)"), ("b2", 1.5, r"in \[0, 1\)"), ("eps", 0.0, "positive"),
                               ("weight_decay", -0.1, ">= 0"), ("weight_decay", float("nan"), ">= 0")):
        with pytest.raises(ValueError, match=rf"config.optimizer.{field} {value}: must be .*{what}"):
            train.make_optimizer(opt_cfg(**{field: value}), 10)


def test_clip_norm_scales_a_large_gradient_to_the_clip_norm():
    """clip_norm 1.0: a gradient of global norm 20 is scaled by 1/20 before AdamW. Adam's
    update does not see one gradient's scale, so two steps: the large gradient, then one of
    norm 0.5 (not clipped); the updates are plain AdamW's on the gradients clipped by hand
    at both steps, and the second differs from AdamW's on the unclipped ones."""
    import optax

    params = random_params(CFG)
    rng = np.random.default_rng(1)

    def of_norm(n):
        g = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        return jax.tree_util.tree_map(lambda x: x * np.float32(n / float(optax.tree.norm(g))), g)

    big, small = of_norm(20.0), of_norm(0.5)

    def updates(opt, grads):
        def run(grads):
            state, out = opt.init(params), []
            for g in grads:
                u, state = opt.update(g, state, params)
                out.append(u)
            return out

        return jax.jit(run)(grads)

    got = updates(train.make_optimizer(opt_cfg(warmup_steps=0, schedule="constant", weight_decay=0.0), 10),
                  [big, small])
    plain = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0)
    by_hand = updates(plain, [jax.tree_util.tree_map(lambda x: x / 20.0, big), small])
    for step in range(2):
        for a, b in zip(jax.tree_util.tree_leaves(got[step]), jax.tree_util.tree_leaves(by_hand[step])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
    unclipped = updates(plain, [big, small])[1]
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(got[1]),
                                                           jax.tree_util.tree_leaves(unclipped))) > 1e-3


def test_weight_decay_spares_norms_and_biases():
    params = random_params(CFG, heads=("lm", "value"))
    mask = train.decay_mask(params)
    assert mask["layers"]["attention"]["wq"] and mask["tok_embeddings"]["embedding"] and mask["output"]
    assert not mask["layers"]["attention_norm"]["scale"] and not mask["norm"]["scale"]
    assert not mask["value_head"]["bias"] and mask["value_head"]["kernel"]
    # With zero gradients, only decayed leaves move (towards zero).
    opt = train.make_optimizer(opt_cfg(warmup_steps=0, schedule="constant"), 10)
    updates, _ = opt.update(jax.tree_util.tree_map(jnp.zeros_like, params), opt.init(params), params)
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0.0
    np.testing.assert_allclose(updates["output"], -1e-2 * 0.1 * params["output"], rtol=1e-5)


def test_a_parameter_group_gets_its_own_schedule():
    """The PPO critic's own learning rate and value-only warm-up: the value head steps at
    its LR, everything else at the "*" schedule (0 during the hold)."""
    import optax

    params = random_params(CFG, heads=("lm", "value"))
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), params)  # tiny: no clipping
    hold = optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(1e-2)], [2])
    opt = train.make_optimizer(opt_cfg(weight_decay=0.0), 10, {"value_head": optax.constant_schedule(0.5), "*": hold})
    state = opt.init(params)
    for step in range(3):
        updates, state = opt.update(grads, state, params)
        # Adam's first steps move each weight by ~lr (the gradient's sign), decay off.
        np.testing.assert_allclose(updates["value_head"]["kernel"], -0.5, rtol=2e-2)  # eps: 0.99 lr
        expected = 0.0 if step < 2 else -1e-2
        np.testing.assert_allclose(updates["layers"]["attention"]["wq"], expected, rtol=2e-2, atol=1e-9)
        np.testing.assert_allclose(updates["output"], expected, rtol=2e-2, atol=1e-9)
    lm_only = random_params(CFG)  # no value head to give a schedule to
    with pytest.raises(ValueError, match=r"schedules for \['value_head'\]: not parameters of this model"):
        train.make_optimizer(opt_cfg(), 10, {"value_head": optax.constant_schedule(0.5)}).init(lm_only)


def whole_batch_grads(params, batch):
    """jax.grad of the batch's mean next-token loss (its sum over its weight), jitted."""
    def mean_loss(p):
        loss_sum, weight, _ = next_token(apply_fn, p, batch)
        return loss_sum / weight

    return jax.jit(jax.grad(mean_loss))(params)


def step_grads(before, after, lr=1.0):
    """The gradient plain SGD at `lr` applied: (before - after) / lr, leaf by leaf."""
    return jax.tree_util.tree_map(lambda b, a: (np.asarray(b) - np.asarray(a)) / lr, before, after)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_grad_accumulation_equals_one_big_batch():
    """Plain SGD at lr 1 (no warm-up, no Adam normalising the gradient's scale away): one
    step moves every parameter by minus the gradient the step used, which with 1, 2 or 4
    micro-batches is jax.grad of the whole batch's mean loss (the accumulated sum over the
    accumulated weight); its norm is the step's grad_norm."""
    import optax

    params = random_params(CFG, std=0.1)
    opt = optax.sgd(1.0)
    batch = make_batch()
    want = whole_batch_grads(params, batch)
    want_norm = float(optax.tree.norm(want))
    loss_sum, weight, _ = jax.jit(lambda p: next_token(apply_fn, p, batch))(params)
    for accum in (1, 2, 4):
        step = jax.jit(train.make_train_step(apply_fn, next_token, opt, grad_accum_steps=accum))
        state, m = step(train.init_state(params, opt), batch)
        assert float(m["loss"]) == pytest.approx(float(loss_sum / weight), rel=1e-6), accum
        assert float(m["weight"]) == float(weight)
        assert float(m["grad_norm"]) == pytest.approx(want_norm, rel=1e-5), accum
        assert_trees_close(step_grads(params, state.params), want)
    with pytest.raises(ValueError, match="batch size 8 is not divisible by grad_accum_steps=3"):
        jax.jit(train.make_train_step(apply_fn, next_token, opt, grad_accum_steps=3))(train.init_state(params, opt),
                                                                                    batch)


def test_a_poisoned_batch_is_detected_and_not_applied():
    params = random_params(CFG, std=0.1)
    opt = train.make_optimizer(opt_cfg(schedule="constant", warmup_steps=0), 100)
    step = jax.jit(train.make_train_step(apply_fn, next_token, opt))
    state = train.init_state(params, opt)
    bad = make_batch()
    bad["loss_mask"] = bad["loss_mask"].at[0, 0].set(jnp.nan)
    new, m = step(state, bad)
    assert bool(m["nonfinite"]) and int(new.nonfinite) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                    jax.tree_util.tree_leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    good, m = step(new, make_batch(seed=1))
    assert not bool(m["nonfinite"]) and int(good.nonfinite) == 1
    assert float(jnp.abs(good.params["output"] - params["output"]).max()) > 0


@pytest.mark.parametrize("settings", [{}, dict(scan_layers=False), dict(attention="splash")],
                         ids=["defaults", "cpu-settings", "splash"])
def test_sharded_train_step_equals_single_device(settings):
    """The 2 x 2 x 2 mesh's step equals one device's step with autodiff's backward passes
    and the einsum attention: with the defaults, which on a CPU are the hand-written MLP
    and head backward passes (their VJPs shard like autodiff's), with the layers unrolled
    too (the CPU settings), and with Splash attention (interpreted here), which runs per
    shard inside shard_map. SGD with momentum at lr 1 (its first step is minus the
    gradient, its trace sharded like the params): the gradients themselves are compared,
    not only the loss, so a wrongly scaled hand-written backward shows."""
    import optax

    params = random_params(CFG, std=0.1)
    opt = optax.sgd(1.0, momentum=0.9)
    batch = make_batch()
    autodiff = Llama(CFG.replace(mlp_backward="xla", head_backward="xla"))

    def apply_autodiff(p, tokens, positions, segment_ids):
        return autodiff.apply({"params": p}, tokens, positions, segment_ids)
    ref_state, ref_m = jax.jit(train.make_train_step(apply_autodiff, next_token, opt))(train.init_state(params, opt),
                                                                                        batch)
    cfg = CFG.replace(**settings)

    def apply_settings(p, tokens, positions, segment_ids):
        return Llama(cfg).apply({"params": p}, tokens, positions, segment_ids)
    step_fn = train.make_train_step(apply_settings, next_token, opt)

    mesh = sharding.make_mesh(2, 2, 2)
    rules = sharding.DEFAULT_RULES
    model = Llama(CFG)
    param_sh = sharding.param_shardings_like(params, model, mesh, rules)
    adam = train.make_optimizer(opt_cfg(), 100)
    adam_sh = train.state_shardings(jax.eval_shape(lambda p: train.init_state(p, adam), params), param_sh, mesh)
    mu = adam_sh.opt_state[1][0].mu  # Adam's first moment: sharded like the params
    assert mu["layers"]["attention"]["wq"] == param_sh["layers"]["attention"]["wq"]
    abstract = jax.eval_shape(lambda p: train.init_state(p, opt), params)
    state_sh = train.state_shardings(abstract, param_sh, mesh)
    assert state_sh.opt_state[0].trace["output"] == param_sh["output"]  # the momentum too
    state = jax.jit(lambda p: train.init_state(p, opt), out_shardings=state_sh)(jax.device_put(params, param_sh))
    batch_sh = {k: sharding.batch_sharding(mesh, rules, v.shape) for k, v in batch.items()}
    run = train.jit_train_step(step_fn, state_sh, batch_sh, mesh, rules)
    new, m = run(state, jax.device_put(batch, batch_sh))
    assert new.params["layers"]["feed_forward"]["w1"].sharding == param_sh["layers"]["feed_forward"]["w1"]
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(float(ref_m["grad_norm"]), rel=1e-5)
    ref_grads = step_grads(params, ref_state.params)  # lr 1: the step is minus the gradient
    assert float(ref_m["grad_norm"]) == pytest.approx(float(optax.tree.norm(ref_grads)), rel=1e-5)
    assert_trees_close(step_grads(params, new.params), ref_grads)
    assert_trees_close(new.opt_state[0].trace, ref_state.opt_state[0].trace)


def stopping(**kw):
    base = dict(metric="val_reward", mode="max", patience=2, min_delta=0.0, guard="", guard_tolerance=0.0)
    return train.EarlyStopping(ml_collections.ConfigDict({**base, **kw}))


def test_early_stopping_keeps_the_best_and_stops_after_patience():
    s = stopping(min_delta=0.01)
    assert s.observe(0, {"val_reward": 0.50})  # the first evaluation is the best so far
    assert s.observe(20, {"val_reward": 0.60})
    assert not s.observe(40, {"val_reward": 0.605})  # within min_delta: not an improvement
    assert not s.reason and s.stale == 1
    assert not s.observe(60, {"val_reward": 0.55})
    assert (s.best_step, s.best, s.stale) == (20, 0.60, 2)
    assert "val_reward has not improved on 0.6 (step 20) for 2 evaluations" == s.reason
    low = stopping(metric="eval_loss", mode="min", patience=1)
    assert low.observe(0, {"eval_loss": 3.0}) and low.observe(5, {"eval_loss": 2.5})
    assert not low.observe(10, {"eval_loss": 2.7}) and low.reason and low.best_step == 5
    held = stopping(patience=1)  # evaluations while the model cannot change (PPO's value warm-up) are not stale
    assert held.observe(0, {"val_reward": 0.5}) and not held.observe(8, {"val_reward": 0.5}, counts=False)
    assert held.stale == 0 and not held.reason
    assert not held.observe(16, {"val_reward": 0.5}) and held.reason
    resumed = stopping(min_delta=0.01)  # the state travels in checkpoints
    resumed.load(s.state())
    assert (resumed.best_step, resumed.best, resumed.stale, resumed.reason) == (20, 0.60, 2, s.reason)
    for other, field in ((dict(metric="val_accuracy"), "metric"), (dict(mode="min"), "mode"),
                         (dict(guard="val_true_accuracy"), "guard")):  # its best is of another metric: refused
        with pytest.raises(train.RunError, match=rf"config.early_stopping.{field}: this run's early stopping kept"):
            stopping(**other).load(s.state())
    # PPO's warm-up evaluations do not count as stale: more saves can follow a best among them
    c = ml_collections.ConfigDict(dict(early_stopping=dict(metric="val_reward", mode="max", patience=1, min_delta=0.0,
                                                           guard="", guard_tolerance=0.0),
                                       eval_every_steps=2, checkpoint_every_steps=2, checkpoint=dict(max_to_keep=2)))
    assert train.EarlyStopping.from_config(c) is not None
    with pytest.raises(train.RunError, match=r"max_to_keep 2 could delete the best checkpoint .*\(4 saves may follow"):
        train.EarlyStopping.from_config(c, held_steps=6)
    # only the warm-up's evaluations lengthen the window: none falls in 3 steps of an evaluation every 4
    c.eval_every_steps, c.checkpoint.max_to_keep = 4, 3
    assert train.EarlyStopping.from_config(c, held_steps=3) is not None  # 2 saves may follow a best
    with pytest.raises(train.RunError, match=r"\(4 saves may follow"):  # the evaluation at 4 is held too
        train.EarlyStopping.from_config(c, held_steps=4)


def test_early_stopping_guard_stops_when_true_accuracy_falls():
    s = stopping(guard="val_sampled_true_accuracy, val_true_accuracy", guard_tolerance=0.02, patience=5)
    assert s.observe(0, {"val_reward": 0.5, "val_true_accuracy": 0.60, "val_sampled_true_accuracy": 0.5})
    assert s.observe(20, {"val_reward": 0.6, "val_true_accuracy": 0.585, "val_sampled_true_accuracy": 0.6})
    # reward still rising, but the greedy code-checked accuracy fell 3 points: not kept, and stop
    assert not s.observe(40, {"val_reward": 0.7, "val_true_accuracy": 0.57, "val_sampled_true_accuracy": 0.6})
    assert s.best_step == 20 and s.reason.startswith("val_true_accuracy fell to 0.57 at step 40 (from 0.6")
    with pytest.raises(train.RunError, match=r"config.early_stopping.guard: 'val_accuracy' is not among .*"
                                             r"\(val_reward\)"):
        stopping(guard="val_accuracy").observe(0, {"val_reward": 0.5})
    with pytest.raises(train.RunError, match="config.early_stopping.mode: 'up' is not 'max' or 'min'"):
        stopping(mode="up")


def test_cpu_description_names_the_model_and_the_matmul_features(tmp_path):
    """Benchmark headers: which CPU, and whether it has AVX-512 / bfloat16 / AMX units
    (they decide which side's kernels are fastest)."""
    from llama_jax.metrics import cpu_description

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
                    "\nprocessor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    assert cpu_description(str(info)).startswith("Test CPU 9000, ")
    assert cpu_description(str(info)).endswith("cores (AVX-512, AMX-BF16)")
    info.write_text("model name\t: Plain\nflags\t\t: fpu sse2\n")
    assert cpu_description(str(info)).endswith("cores") and "(" not in cpu_description(str(info))
    assert "cores" in cpu_description(str(tmp_path / "missing"))  # no /proc/cpuinfo: the platform's name


def test_tensorboard_output_leaves_torch_unimported(tmp_path):
    """tensorboardX imports PyTorch when it is installed (2-3 s of every run's start);
    the metrics writer imports it with torch hidden, still writes its scalars, and torch
    stays importable afterwards."""
    import subprocess
    import sys

    code = ("import glob, sys\n"
            "from llama_jax.metrics import MetricsWriter\n"
            f"w = MetricsWriter({str(tmp_path)!r})\n"
            "w.write(1, {'loss': 2.5})\n"
            "w.close()\n"
            "assert w.tb is not None and 'torch' not in sys.modules, sorted(sys.modules)[:5]\n"
            f"assert glob.glob({str(tmp_path / 'tensorboard' / 'events.out.tfevents.*')!r})\n"
            "import torch\n"
            "print('torch', torch.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("torch ")


def test_a_prompt_stream_every_process_shares_resumes_under_another_process_count(capsys):
    """PPO's prompts are one stream all processes read: a checkpoint written by 2
    processes puts a 1-process run at the same position (it repeated the iterations
    since the start). A per-process pipeline starts afresh then, and says so."""
    from llama_jax.stages import PromptCycle
    from llama_jax.train import _restore_data

    cycle = PromptCycle(list(range(10)), 4, seed=0)
    _restore_data(cycle, {"processes": [{"position": 8}, {"position": 8}]}, step=2, lead=True)
    assert cycle.position == 8 and "warning" not in capsys.readouterr().out

    class PerProcess:
        restored = None

        def restore(self, state):
            self.restored = state

    own = PerProcess()
    _restore_data(own, {"processes": [{"position": 8}, {"position": 5}]}, step=2, lead=True)
    assert own.restored is None and "written by 2 processes and this run has 1" in capsys.readouterr().out


def test_a_workdirs_data_is_reused_only_with_the_settings_that_made_it(tmp_path):
    """data/settings.json is recorded before a stage makes its data; with data made, a run
    of other data-making settings is refused naming them (not fed the old files), while
    training-only settings and fields added to the code since the record may differ.
    With nothing made yet (a run refused or killed first), the next run records its own."""
    import json
    import os

    from llama_jax.configs import chat_config
    from llama_jax.train import RunError, _data_settings

    c = chat_config()
    workdir, path = str(tmp_path), os.path.join(str(tmp_path), "data", "settings.json")
    _data_settings(workdir, c, record=True)
    assert json.load(open(path))["data.synthetic_train"] == 4000
    c.data.synthetic_train = 100  # nothing made yet: recorded anew
    _data_settings(workdir, c, record=True)
    assert json.load(open(path))["data.synthetic_train"] == 100
    open(os.path.join(workdir, "data", "chat_train.jsonl"), "w").write("{}\n")
    c.optimizer.learning_rate, c.total_steps, c.eval_steps = 1.0, 5, 3  # training only
    _data_settings(workdir, c, record=True)
    c.data.synthetic_train, c.seed = 200, 7
    with pytest.raises(RunError, match=r"made with other settings \(data.synthetic_train 100 -> 200, seed 0 -> 7\)"):
        _data_settings(workdir, c, record=False)
    c.data.synthetic_train, c.seed = 100, 0
    record = json.load(open(path))
    del record["data.synthetic_mix"]  # a field the code did not have when the data was made
    json.dump(record, open(path, "w"))
    c.data.synthetic_mix = 0.5
    _data_settings(workdir, c, record=True)
    # a file a field names, edited: other data (a prompt file rewritten between runs trained on the old answers)
    prompts = tmp_path / "own.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    c.data.source = f"{prompts}@1"  # a mixture weight, as preference sources take
    (tmp_path / "fresh").mkdir()
    _data_settings(str(tmp_path / "fresh"), c, record=True)
    open(tmp_path / "fresh" / "data" / "made.jsonl", "w").write("{}\n")
    _data_settings(str(tmp_path / "fresh"), c, record=False)  # the same file: fine
    prompts.write_text('{"messages": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(RunError, match=r"other settings \(the files data.source names \(edited\)\)"):
        _data_settings(str(tmp_path / "fresh"), c, record=False)


def test_init_from_is_a_data_setting_only_of_stages_that_sample_from_it(tmp_path, monkeypatch):
    """PPO's prompts and DPO's toy pairs do not depend on init_from: a resume from the same
    reference under another path (moved, a symlink) reaches the reference checks rather than
    being refused as other data; rejection sampling's answers are init_from's, so another model
    is refused, the same one by another name (a symlink) is not."""
    import os

    from llama_jax.configs import chat_config
    from llama_jax.stages import STAGES
    from llama_jax.train import RunError, _data_settings

    model, other = tmp_path / "sft", tmp_path / "other"
    model.mkdir(), other.mkdir()
    os.symlink(model, tmp_path / "link")
    for name, samples in (("ppo", False), ("dpo", False), ("rejection_sampling", True), ("gatt", True),
                          ("safety_distill", True), ("reward_model", False)):
        stage, c = STAGES[name](), chat_config()
        workdir = tmp_path / name
        c.init_from = str(model)
        _data_settings(str(workdir), c, record=True, stage=stage)
        (workdir / "data" / "made.jsonl").write_text("{}\n")
        c.init_from = str(tmp_path / "link")
        _data_settings(str(workdir), c, record=False, stage=stage)  # the same model by another name
        c.init_from = str(other)
        if samples:
            with pytest.raises(RunError, match="init_from"):
                _data_settings(str(workdir), c, record=False, stage=stage)
        else:
            _data_settings(str(workdir), c, record=False, stage=stage)
    # every process follows the lead's verdict (its own view of the disk may lag: data the lead has begun to make)
    from llama_jax import distributed

    stage, c = STAGES["rejection_sampling"](), chat_config()
    c.init_from = str(other)  # another model than the one the data was made with: the lead saw no change, though
    monkeypatch.setattr(distributed, "allgather_json", lambda mine: [mine if isinstance(mine, dict) else ""])
    _data_settings(str(tmp_path / "rejection_sampling"), c, record=False, stage=stage)
    monkeypatch.setattr(distributed, "allgather_json",
                        lambda mine: [mine if isinstance(mine, dict) else "the lead's refusal"])
    with pytest.raises(RunError, match="the lead's refusal"):
        _data_settings(str(tmp_path / "ppo"), chat_config(), record=False, stage=STAGES["ppo"]())
    monkeypatch.undo()
    # the reward model with pairs from the policy's answers (reward.policy_prompts, the policy init_from)
    from procs import load_experiment

    c = load_experiment("reward_model").get_config("tiny")
    stage = STAGES["reward_model"]()
    assert not stage.data_reads_init_from(c)
    c.reward.policy_prompts, c.init_from = 64, str(model)
    assert stage.data_reads_init_from(c)
    c.reward.policy = str(other)  # the answers are reward.policy's, a data setting of its own
    assert not stage.data_reads_init_from(c)
    c.reward.policy = ""
    _data_settings(str(tmp_path / "rm_policy"), c, record=True, stage=stage)
    (tmp_path / "rm_policy" / "data" / "made.jsonl").write_text("{}\n")
    c.init_from = str(other)
    with pytest.raises(RunError, match="init_from"):
        _data_settings(str(tmp_path / "rm_policy"), c, record=False, stage=stage)


def test_epochs_set_total_steps_from_the_training_data(tmp_path, tokenizer_path, capsys):
    """config.epochs (the paper's SFT: 2, reward models: 1): total_steps is set at the start
    from the rows one pass over the data makes, before the schedule is made of it (the run
    ends there, its warm-up and cosine fitted to it); stages without a fixed-size data set
    refuse it before anything is read."""
    import json
    import math
    import os

    from procs import load_experiment

    from llama_jax import stages, train
    from llama_jax.data import chat
    from llama_jax.tokenizer import Tokenizer

    c = load_experiment("sft").get_config("tiny")
    c.init_from, c.data.tokenizer, c.data.eval_source, c.eval_exact_match = "", tokenizer_path, "", 0
    c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads, c.model.vocab_size = 48, 1, 4, 2, 512
    # 3 held-out dialogs pack into fewer rows than a batch of 4: evaluated, their batch padded (it gave no eval loss)
    c.data.synthetic_train, c.data.synthetic_eval, c.seq_len, c.batch_size = 30, 3, 64, 4
    c.epochs, c.total_steps, c.log_every_steps, c.checkpoint.async_save, c.eval_steps = 1.5, 1000, 1, False, 1
    c.optimizer.warmup_steps = 1
    workdir = str(tmp_path / "sft")
    train.run(c, workdir, stages.SFTStage())
    data = chat.make_dataset(os.path.join(workdir, "data", "chat_train.jsonl"), Tokenizer(tokenizer_path), 64, 4)
    want = math.ceil(1.5 * data.rows_per_epoch / 4)
    data.close()
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == want
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert max(r["step"] for r in rows) == want and f"epochs: total_steps {want} (config.epochs 1.5) x batch_size 4" \
        in capsys.readouterr().out
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert 0 < final["eval_loss"] < 20 and 0 <= final["eval_accuracy"] <= 1
    saved = json.load(open(os.path.join(workdir, "checkpoints", str(want), "data", "metadata")))
    assert saved["data"] == {"source": os.path.join(workdir, "data", "chat_train.jsonl"), "dialogs": 30}  # to tell
    # a resume on other data
    # a total_steps given on the command line wins over a preset's epochs, said; both given is an error
    c.total_steps = 2
    train.run(c, str(tmp_path / "steps"), stages.SFTStage(), overrides={"total_steps": 2})
    assert "note: --config.total_steps 2 given: the preset's config.epochs 1.5 is not used" in capsys.readouterr().out
    assert json.load(open(tmp_path / "steps" / "config.json"))["total_steps"] == 2
    c.epochs = 1.5
    with pytest.raises(train.RunError, match="--config.epochs and --config.total_steps both given"):
        train.run(c, str(tmp_path / "both"), stages.SFTStage(), overrides={"total_steps": 2, "epochs": 1.5})
    assert "epochs" not in train._data_fields(c) and "seq_len" in train._data_fields(c)  # another epochs: same data
    p = load_experiment("pretrain").get_config("tiny")
    p.epochs = 1.0
    with pytest.raises(train.RunError, match="config.epochs 1.0: stage pretrain's training data has no fixed size"):
        train.check_config(p, stages.PretrainStage())
    p.epochs, p.checkpoint.keep_period = 0.0, -1  # (Orbax would keep every step)
    with pytest.raises(train.RunError, match="config.checkpoint.keep_period must be an integer >= 0"):
        train.check_config(p, stages.PretrainStage())
    rm = load_experiment("reward_model").get_config("tiny")
    rm.epochs = 1.0
    train.check_config(rm, stages.RewardModelStage())  # pairs: a fixed size
    rm.epochs = -1.0
    with pytest.raises(train.RunError, match="config.epochs must be a number >= 0"):
        train.check_config(rm, stages.RewardModelStage())


def test_held_out_passes_score_every_example_when_process_shards_are_uneven(monkeypatch):
    """Two processes whose held-out shards hold 2 and 1 batches (the second short): the
    pass scores all three, the process that ran out scoring rows of zeros while the other
    still has a batch, and stops when neither has one (before, every process stopped at
    the first batch one of them lacked, and the rest of the set was never scored)."""
    from llama_jax import distributed
    from llama_jax.train import empty_batch, held_out_sums

    other = iter([True, True, False])  # process 1 has batches at the first two calls
    monkeypatch.setattr(distributed, "allgather_json", lambda has: [has, next(other)])
    mine = iter([{"tokens": np.ones((4, 3), np.int32)}])  # process 0: one batch
    empty = empty_batch({"tokens": jax.ShapeDtypeStruct((8, 3), jnp.int32)}, 4)
    scored = []

    def score(b):
        scored.append(int(b["tokens"].sum()))
        return b["tokens"].sum(), len(b["tokens"]), {"acc": 1.0}

    total, weight, sums, batches = held_out_sums(mine, 5, empty, score)
    assert scored == [12, 0] and batches == 2 and total == 12 and weight == 8 and sums == {"acc": 2.0}
    # a short batch is padded to the process's rows with zeros
    monkeypatch.setattr(distributed, "allgather_json", lambda has: [has])
    assert held_out_sums(iter([{"tokens": np.ones((3, 3), np.int32)}]), 5, empty,
                         lambda b: (b["tokens"].sum(), b["tokens"].shape[0], {}))[:2] == (9, 4)


def test_an_override_of_a_field_the_stage_never_reads_is_refused_unless_it_repeats_the_default():
    from llama_jax import cli

    experiments = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    for experiment, flag, refused in (("dpo", "sample.prompt=hi", True), ("dpo", "sample.prompt=", False),
                                      ("reward_model", "data.pack=False", True), ("sft", "data.pack=False", False),
                                      ("rejection_sampling", "data.synthetic_mix=0.5", False),
                                      ("ppo", "sample.top_p=0.5", True), ("pretrain", "sample.top_p=0.5", False),
                                      ("pretrain", "eval_max_new_tokens=8", True),
                                      ("pretrain", "eval_exact_match=0", False),  # base_config's default (chat's: 200)
                                      ("safety_distill", "data.synthetic_adversarial=0.5", False),  # its prompts
                                      ("gatt", "data.synthetic_adversarial=0.5", True)):
        argv = [f"--config={experiments}/{experiment}.py:tiny", f"--config.{flag}"]
        if refused:
            with pytest.raises(ValueError, match=rf"--config.{re.escape(flag)}: stage {experiment} does not read it"):
                cli.check_run(argv)
        else:
            cli.check_run(argv)
    # the recipe's "all:" override reaches the stages that read the field (the others would refuse it)
    from llama_jax import recipe

    extra = recipe.stage_overrides(["all:eval_max_new_tokens=16", "all:sample.prompt=x"], None)
    assert extra["pretrain"] == ["--config.sample.prompt=x"] and extra["rm"] == []
    assert extra["sft"] == extra["ppo"] == ["--config.eval_max_new_tokens=16"]


def test_a_run_id_is_made_once_and_kept(tmp_path):
    from llama_jax import workdir

    first = workdir.run_id(str(tmp_path))
    assert workdir.run_id(str(tmp_path)) == first == (tmp_path / "run_id").read_text().strip() and len(first) == 32
    (tmp_path / "other").mkdir()
    assert workdir.run_id(str(tmp_path / "other")) != first  # another workdir: its own
