"""The train state, the paper's optimizer, and the one jitted, sharded train step.

Every stage (pretraining, SFT, reward models, DPO, the PPO update) runs `make_train_step`
with its own objective (see objectives.py); nothing here knows which stage it serves.

Optimizer (paper, section 2.2): AdamW with b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1,
global-norm gradient clipping at 1.0, linear warmup then cosine decay to 10% of the peak
learning rate. Weight decay applies to every weight matrix, the token embedding and the
output head included, and not to RMSNorm scales or head biases (the paper does not say;
this is the common choice, and decaying a norm's scale towards 0 is never wanted).
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.objectives import PPO_FEATURES, Objective


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: updates applied (skipped non-finite steps count too)
    params: Any
    opt_state: Any
    nonfinite: jax.Array  # [] int32: steps whose update was skipped for a non-finite loss/grad


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """`cosine`: linear warmup to the peak, cosine decay to `final_lr_fraction` of it at
    `total_steps`; `constant`: warmup then flat (PPO)."""
    peak = float(opt_cfg.learning_rate)
    warmup = int(opt_cfg.warmup_steps)
    if opt_cfg.schedule not in ("cosine", "constant") or warmup < 0:
        raise ValueError(f"config.optimizer.schedule: {opt_cfg.schedule!r} with warmup_steps {warmup}: the "
                         "schedule must be 'cosine' or 'constant' and warmup_steps >= 0")
    if not peak >= 0 or not 0 <= float(opt_cfg.final_lr_fraction) <= 1:
        raise ValueError(f"config.optimizer.learning_rate {opt_cfg.learning_rate} with final_lr_fraction "
                         f"{opt_cfg.final_lr_fraction}: the peak must be >= 0 and the fraction in [0, 1]")
    if opt_cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                    [warmup]) if warmup else optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=peak * float(opt_cfg.final_lr_fraction))


def warmup_warning(config) -> str:
    """A warning when the run ends inside its warm-up (a short ablation of a paper preset
    with its 2000 warm-up steps), else ""."""
    warmup, total = int(config.optimizer.warmup_steps), int(config.total_steps)
    if warmup < total:
        return ""
    return (f"warning: config.optimizer.warmup_steps {warmup} >= config.total_steps {total}: the learning rate "
            f"never reaches its peak ({float(config.optimizer.learning_rate):g})")


def decay_mask(params) -> Any:
    """True for leaves that get weight decay: everything but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("scale", "bias"), params)


def make_optimizer(opt_cfg, total_steps: int, schedules: dict[str, optax.Schedule] | None = None
                   ) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. `schedules` gives top-level parameters their own
    learning-rate schedule ({"value_head": ...}; the key "*" replaces the schedule of all
    the others), e.g. a critic that learns faster than the policy it shares a trunk with;
    the clipping is over all gradients together either way."""
    if not float(opt_cfg.clip_norm) >= 0:
        raise ValueError(f"config.optimizer.clip_norm {opt_cfg.clip_norm} is negative (0 = no clipping)")
    for field, ok, what in (("b1", lambda v: 0 <= v < 1, "in [0, 1)"), ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
                            ("eps", lambda v: 0 < v < math.inf, "a positive number"),
                            ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0")):
        if not ok(float(getattr(opt_cfg, field))):  # (AdamW diverges, or decays towards a growing weight)
            raise ValueError(f"config.optimizer.{field} {getattr(opt_cfg, field)}: must be {what}")
    # clip_by_global_norm(0) would zero every gradient; identity keeps the state's layout
    clip = optax.clip_by_global_norm(float(opt_cfg.clip_norm)) if float(opt_cfg.clip_norm) else optax.identity()

    def adamw(schedule):
        return optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                           weight_decay=float(opt_cfg.weight_decay), mask=decay_mask)

    schedules = dict(schedules or {})
    default = schedules.pop("*", None) or learning_rate_schedule(opt_cfg, total_steps)
    if not schedules:
        return optax.chain(clip, adamw(default))
    groups = {name: adamw(s) for name, s in schedules.items()}
    groups["*"] = adamw(default)

    def labels(params):
        unknown = sorted(set(schedules) - set(params))
        if unknown:
            raise ValueError(f"learning-rate schedules for {unknown}: not parameters of this model "
                             f"(its top-level parameters: {sorted(params)})")
        return {k: (k if k in schedules else "*") for k in params}

    return optax.chain(clip, optax.multi_transform(groups, labels))


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      nonfinite=jnp.zeros((), jnp.int32))


def state_shardings(abstract_state: TrainState, param_shardings, mesh) -> TrainState:
    """Shardings for a TrainState: every optimizer leaf that mirrors a parameter (same
    key path suffix and shape: Adam's moments, masked or not) is sharded like it; other
    leaves (counts, scalars) are replicated."""
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (path, sh), leaf in zip(jax.tree_util.tree_leaves_with_path(param_shardings),
                                jax.tree_util.tree_leaves(abstract_state.params)):
        by_path[tuple(path)] = (sh, leaf.shape)

    def one(path, leaf):
        path = tuple(path)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return replicated

    opt = jax.tree_util.tree_map_with_path(one, abstract_state.opt_state)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, nonfinite=replicated)


def _split_micro(batch: dict, n: int) -> dict:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


def make_train_step(apply_fn: Callable, objective: Objective, optimizer: optax.GradientTransformation,
                    grad_accum_steps: int = 1) -> Callable[..., tuple[TrainState, dict]]:
    """A pure step: (state, batch, frozen=None) -> (state, metrics). `frozen` (params that
    are not trained, e.g. DPO's reference policy) is handed to the objective. Gradients are accumulated over
    `grad_accum_steps` micro-batches inside the step (lax.scan), then normalised by the
    total weight. A non-finite loss or gradient skips the update (params and optimizer
    state unchanged) and raises `metrics["nonfinite"]`; the loop decides what to do."""

    def step(state: TrainState, batch: dict, frozen=None):
        def loss_and_grads(params, micro):
            def f(p):
                loss_sum, weight, sums = objective(apply_fn, p, micro, frozen)
                return loss_sum, (weight, sums)

            (loss_sum, (weight, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
            return loss_sum, weight, sums, grads

        if grad_accum_steps == 1:
            loss_sum, weight, sums, grads = loss_and_grads(state.params, batch)
        else:
            micro = _split_micro(batch, grad_accum_steps)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            _, _, sums0, _ = jax.eval_shape(loss_and_grads, state.params, first)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                    jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums0), zeros)

            def body(carry, mb):
                loss_mb, w, s, g = loss_and_grads(state.params, mb)
                cl, cw, cs, cg = carry
                return (cl + loss_mb, cw + w, jax.tree_util.tree_map(jnp.add, cs, s),
                        jax.tree_util.tree_map(jnp.add, cg, g)), None

            (loss_sum, weight, sums, grads), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(ok, new, old))
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state),
                               nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "weight": weight, "nonfinite": ~ok,
                   **{k: v / denom for k, v in sums.items()}}
        return new_state, metrics

    return step


def make_eval_step(apply_fn: Callable, objective: Objective):
    """(params, batch) -> (loss_sum, weight, metric_sums); the caller sums over batches."""

    def step(params, batch, frozen=None):
        return objective(apply_fn, params, batch, frozen)

    return step


def jit_train_step(step_fn, state_sh: TrainState, batch_sh, mesh, rules, frozen_sh=None):
    """The sharded, jitted step with the state donated (frozen params are not)."""
    from llama_jax import sharding

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, replicated),
                     donate_argnums=0)

    def run(state, batch, frozen=None):
        with sharding.activate(mesh, rules):
            return jitted(state, batch, frozen)

    run.jitted = jitted
    return run


# ----------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------


class RunError(RuntimeError):
    """A run that cannot start or continue; main prints the message and exits non-zero."""


class Preempted(RunError):
    """The run saved a checkpoint on a preemption notice (SIGTERM) and stopped; a rerun of
    the same command resumes from it. main exits with 143 (128 + SIGTERM)."""


class EarlyStopping:
    """Keeps the evaluation with the best `metric` (paper 3.2.3: PPO is early-stopped on
    held-out prompts) and says when to stop: after `patience` evaluations without an
    improvement of more than `min_delta`, or at once when one of the optional `guard`
    metrics (comma-separated, higher is better, e.g. true accuracies checked by code)
    falls more than `guard_tolerance` below its value at the first evaluation (step 0).
    An evaluation whose guard has fallen is never the best. Its state travels in
    checkpoints."""

    def __init__(self, cfg):
        self.metric, self.mode = str(cfg.metric), str(cfg.mode)
        self.guards = [g.strip() for g in str(cfg.guard).split(",") if g.strip()]
        self.patience, self.min_delta, self.tolerance = int(cfg.patience), float(cfg.min_delta), \
            float(cfg.guard_tolerance)
        if self.mode not in ("max", "min"):
            raise RunError(f"config.early_stopping.mode: {self.mode!r} is not 'max' or 'min'")
        if self.patience < 1:
            raise RunError(f"config.early_stopping.patience: {self.patience} must be at least 1")
        self.best: float | None = None
        self.best_step: int | None = None
        self.guard_start: dict[str, float] = {}
        self.stale = 0  # evaluations since the best
        self.reason = ""  # why training stopped ("" = it has not)

    @classmethod
    def from_config(cls, config, held_steps: int = 0) -> "EarlyStopping | None":
        """The run's stopper (None when early_stopping.metric is empty), after checking that
        the run evaluates and keeps enough checkpoints for the best to survive (`held_steps`:
        the stage's first steps whose evaluations are not counted as stale, which lengthen
        the window after a best found among them)."""
        if not config.early_stopping.metric:
            return None
        stopper = cls(config.early_stopping)
        if not config.eval_every_steps:
            raise RunError("config.early_stopping.metric needs evaluations: set config.eval_every_steps > 0")
        # periodic saves in the window after the best: at most ceil(window / checkpoint interval); the window is
        # `patience` counted evaluations, after those held (not counted) that a best at step 0 may precede
        held = held_steps // config.eval_every_steps * config.eval_every_steps
        later = -(-(stopper.patience * config.eval_every_steps + held) // config.checkpoint_every_steps)
        if config.checkpoint.max_to_keep and config.checkpoint.max_to_keep < later + 1:
            raise RunError(f"config.checkpoint.max_to_keep {config.checkpoint.max_to_keep} could delete the best "
                           f"checkpoint before early stopping returns to it ({later} saves may follow it at "
                           f"early_stopping.patience {stopper.patience}); set it to {later + 1} or more")
        return stopper

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("metric", "mode", "guards", "best", "best_step", "guard_start",
                                              "stale", "reason")}

    def load(self, saved: dict | None) -> None:
        """Takes up a checkpoint's state; one kept for another metric, mode or guards
        (whose best value this run's could not be compared with) is refused."""
        saved = dict(saved or {})
        for k in ("metric", "mode", "guards"):  # (absent from checkpoints of earlier versions)
            if k in saved and saved[k] != getattr(self, k):
                raise RunError(f"config.early_stopping.{k.rstrip('s') if k == 'guards' else k}: this run's early "
                               f"stopping kept {k} {saved[k]!r} (its best, step {saved.get('best_step')}, is of it); "
                               f"resuming with {getattr(self, k)!r} would compare the two: set it back, or use a new "
                               "--workdir")
            saved.pop(k, None)
        for k, v in saved.items():
            setattr(self, k, v)

    def _value(self, ev: dict, name: str, field: str) -> float:
        if name not in ev:
            raise RunError(f"config.early_stopping.{field}: {name!r} is not among this stage's evaluation metrics "
                           f"({', '.join(sorted(ev)) or 'none'})")
        return float(ev[name])

    def observe(self, step: int, ev: dict, counts: bool = True) -> bool:
        """Records the evaluation at `step`; True if it is the new best (keep its weights).
        `counts` False: the model has not changed yet (PPO's value warm-up), so an
        evaluation that is no better is not a stale one."""
        value = self._value(ev, self.metric, "metric")
        for name in self.guards:
            g = self._value(ev, name, "guard")
            start = self.guard_start.setdefault(name, g)
            if g < start - self.tolerance:
                self.reason = (f"{name} fell to {g:.4g} at step {step} (from {start:.4g} at step 0, "
                               f"tolerance {self.tolerance:g})")
                return False
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_step, self.stale = value, step, 0
            return True
        if not counts:
            return False
        self.stale += 1
        if self.stale >= self.patience:
            self.reason = (f"{self.metric} has not improved on {self.best:.4g} (step {self.best_step}) "
                           f"for {self.stale} evaluations")
        return False


def _global_batch(batch: dict, shardings: dict) -> dict:
    """This process's numpy batch -> global jax arrays on the mesh (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def empty_batch(abstract_batch: dict, rows: int) -> dict[str, np.ndarray]:
    """A process's batch of `rows` rows of zeros, which every objective weighs 0 (no
    segment, no trained token; see pipeline.pad_batch), shaped as the global batch."""
    return {k: np.zeros((rows,) + tuple(a.shape[1:]), a.dtype) for k, a in abstract_batch.items()}


def held_out_sums(data, steps: int, empty: dict, score) -> tuple[float, float, dict, int]:
    """(loss sum, weight, metric sums, batches) of up to `steps` held-out batches of
    `data`, scored by `score(batch) -> (loss_sum, weight, {metric: sum})`. A short last
    batch is padded with rows that weigh nothing. The processes' shards can hold different
    numbers of batches: a process that has run out scores `empty` (rows of zeros) while
    another still has one, so that every example is scored and the collectives match;
    all stop when none has a batch left."""
    from llama_jax import distributed
    from llama_jax.data.pipeline import pad_batch

    rows = len(next(iter(empty.values())))
    total, weight, sums, batches = 0.0, 0.0, {}, 0
    for _ in range(steps):
        b = next(data, None)
        if not any(distributed.allgather_json(b is not None)):
            break
        loss_sum, w, s = score(empty if b is None else pad_batch(b, rows))
        total, weight, batches = total + float(loss_sum), weight + float(w), batches + 1
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return total, weight, sums, batches


def _data_counts(train_data) -> dict:
    """What a checkpoint records of its training data, to tell a resume on other data."""
    described = getattr(train_data, "description", None) or {}
    return {k: described[k] for k in ("source", "documents", "dialogs", "pairs") if k in described}


def _restore_data(train_data, saved: dict, step: int, lead: bool) -> None:
    """Puts this process's input pipeline where the checkpoint left it. Checkpoints hold
    one iterator state per process; restored by another number of processes, the
    pipelines start afresh (each process's documents differ), which the lead reports,
    unless every process read the same stream (`shared_by_processes`, PPO's prompts).
    Data other than the checkpoint's (another file, or more or fewer examples) is warned
    about: the saved position then points into other data."""
    was, now = saved.get("data") or {}, _data_counts(train_data)
    changed = [f"{k} {was[k]} -> {now.get(k)}" for k in was if was[k] != now.get(k)]
    if changed and lead:
        print(f"warning: the training data is not the checkpoint's (step {step}: {', '.join(changed)}); the saved "
              "position in it is restored into this data, so this pass over it may repeat or skip examples",
              flush=True)
    states = saved["processes"] if "processes" in saved else [saved]  # older single-process layout
    mine = states[jax.process_index()] if len(states) == jax.process_count() else \
        states[0] if getattr(train_data, "shared_by_processes", False) and all(s == states[0] for s in states) \
        else None
    if mine is not None:
        try:
            train_data.restore(mine)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RunError(f"the checkpoint of step {step} holds the state of another input pipeline than this "
                           f"run's ({type(e).__name__}: {e}): a data setting that shapes it changed (data.pack, the "
                           "stage's data); resume with the original data settings, or use a new --workdir") from None
    elif lead:
        print(f"warning: the checkpoint of step {step} was written by {len(states)} processes and this run has "
              f"{jax.process_count()}: the input pipeline starts from the beginning of its shard instead of "
              "resuming exactly", flush=True)


def build_step(config, cfg, stage, mesh, rules) -> types.SimpleNamespace:
    """What the train step of `stage` is made of, from shapes alone (nothing allocated):
    model, apply_fn, optimizer, param_sh, abstract_state (ShapeDtypeStructs carrying their
    shardings), state_sh, objective, step_fn, batch_sh and abstract_batch. Used by `run`
    and by `launch/aot_compile.py`."""
    from llama_jax import sharding
    from llama_jax.model import Llama

    model = Llama(cfg, stage.heads, **stage.model_options(config))

    def apply_fn(params, tokens, positions, segment_ids, score_mask=None):
        return model.apply({"params": params}, tokens, positions, segment_ids, score_mask=score_mask)

    optimizer = make_optimizer(config.optimizer, config.total_steps, stage.learning_rates(config))
    param_sh = sharding.param_shardings_like(sharding.abstract_params(model), model, mesh, rules)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), sharding.abstract_params(model))
    state_sh = state_shardings(abstract, param_sh, mesh)
    abstract_state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                            abstract, state_sh)
    objective = stage.objective(config)
    spec = stage.batch_spec(config)
    batch_sh = {k: sharding.batch_sharding(mesh, rules, shape) for k, shape in spec.items()}
    floats = ("margin",) + PPO_FEATURES
    dtype = {k: jnp.float32 if k.endswith("loss_mask") or k in floats else jnp.int32 for k in spec}
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype[k], sharding=batch_sh[k]) for k, shape in spec.items()}
    return types.SimpleNamespace(
        model=model, apply_fn=apply_fn, optimizer=optimizer, param_sh=param_sh, abstract_state=abstract_state,
        state_sh=state_sh, objective=objective, batch_sh=batch_sh, abstract_batch=abstract_batch,
        step_fn=make_train_step(apply_fn, objective, optimizer, config.grad_accum_steps))


def run(config, workdir: str, stage, overrides: dict | None = None) -> dict:
    """Trains `stage` (see llama_jax.stages) as `config` says, in `workdir`, resuming
    from its latest checkpoint. Returns the final metrics. `overrides`: the fields the
    command line set (`{"model.n_layers": 2}`), checked against `init_from`'s model."""
    from llama_jax import workdir as workdir_lock

    try:
        return _run(config, workdir, stage, overrides)
    finally:  # the workdir's lock, however the run ended (a later run of this process takes it again)
        workdir_lock.release(workdir)


def run_model(config, stage, overrides: dict | None = None):
    """The LlamaConfig a run trains: `config.model`, or with `init_from` the checkpoint's
    architecture with this config's numerics (INIT_FROM_FIELDS). `overrides` (the command
    line's, `{"model.n_layers": 2}`) must agree with that checkpoint's model, except a
    longer context (`max_seq_len`: RoPE has no learned positions). None: not known (a run
    started from Python): config.model's architecture fields that differ from the
    checkpoint's are named in a note, since they are not used."""
    from llama_jax import checkpoint as ckpt
    from llama_jax import configs
    from llama_jax.model import INIT_FROM_FIELDS, check_attention_kernel

    from_python, overrides = overrides is None, overrides or {}
    try:
        cfg = configs.to_llama_config(config.model)
        if config.init_from:  # the architecture comes from the checkpoint; numerics from this config
            try:
                _, init_meta = ckpt.read_meta(config.init_from)
            except ckpt.CheckpointError as e:
                raise RunError(f"config.init_from: {e}") from None
            asked = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
            unused = ckpt.model_fields_differing(init_meta["model"], cfg.to_dict(), ignore=INIT_FROM_FIELDS)
            if from_python and unused and jax.process_index() == 0:
                mine, theirs = cfg.to_dict(), ckpt.model_config(init_meta).to_dict()
                print(f"note: config.init_from {config.init_from}: the run trains its model; config.model's "
                      + ", ".join(f"{k} {mine[k]!r} (it has {theirs[k]!r})" for k in unused)
                      + f" are not used (only {', '.join(INIT_FROM_FIELDS)} apply; from Python, pass "
                      "overrides={'model.max_seq_len': N} to run for a longer context)", flush=True)
            cfg = ckpt.model_config(init_meta, **{k: getattr(cfg, k) for k in INIT_FROM_FIELDS},
                                    **({"max_seq_len": asked["max_seq_len"]} if "max_seq_len" in asked else {}))
            clash = {k: v for k, v in asked.items() if k not in INIT_FROM_FIELDS and getattr(cfg, k, v) != v}
            if clash:
                raise RunError(f"config.init_from {config.init_from}: the model is the checkpoint's, so "
                               + ", ".join(f"--config.model.{k}={v} (it has {getattr(cfg, k)!r})"
                                           for k, v in clash.items())
                               + f" cannot apply; only {', '.join(INIT_FROM_FIELDS + ('max_seq_len',))} can")
            had = list(init_meta.get("heads", ["lm"]))
            if "lm" in stage.heads and "lm" not in had:  # its output layer would start from noise
                raise RunError(f"config.init_from {config.init_from}: has heads {had}, not the 'lm' head stage "
                               f"{config.stage!r} goes on from; start from a language model (a pretraining or SFT "
                               "run, or a converted checkpoint)")
            pooled = ckpt.model_config(init_meta).score_pooling  # the default if saved before the field
            if "score" in stage.heads and "score" in init_meta.get("heads", []) and pooled != cfg.score_pooling:
                raise RunError(f"config.init_from {config.init_from}: its score head was trained with "
                               f"score_pooling={pooled!r}; set --config.model.score_pooling={pooled} "
                               f"(this run has {cfg.score_pooling!r})")
        check_attention_kernel(cfg)  # a kernel this backend cannot run is an error here, before any work
    except ValueError as e:
        raise RunError(f"config.model: {e}") from None
    return cfg


# Settings that change nothing a stage writes into WORKDIR/data (toy data, sampled answers,
# GAtt dialogs): how it trains, evaluates, saves and computes. Every other field does.
_DATA_NEUTRAL = ("optimizer.", "checkpoint.", "metrics.", "mesh.", "early_stopping.", "sample.", "ppo.", "dpo.",
                 "model.", "data.prefetch", "total_steps", "epochs", "log_every_steps", "checkpoint_every_steps",
                 "eval_every_steps", "eval_steps", "nonfinite_policy", "grad_accum_steps", "batch_size",
                 "eval_exact_match")


def _data_fields(config) -> dict:
    import json

    from llama_jax.compare import flatten

    flat = flatten(json.loads(config.to_json_best_effort()))
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n) for n in _DATA_NEUTRAL)}


def _input_files(fields: dict) -> dict:
    """`files:FIELD`: a digest of the files a string field names (globs, comma-separated,
    a KIND: prefix or @WEIGHT allowed), for each field that names some: an edited prompt
    file changes the data a stage makes, as a changed path does. Contents are hashed up to
    256 MB a field, beyond that only the sizes (a copy of the same data, with other
    modification times, is the same data)."""
    import glob
    import hashlib
    import os

    out = {}
    for field, value in fields.items():
        if not isinstance(value, str) or not value or value == "synthetic":
            continue
        files = sorted({f for part in value.split(",") for f in glob.glob(
            os.path.expanduser(part.split(":", 1)[-1].rsplit("@", 1)[0].strip()), recursive=True)
            if part.strip() and os.path.isfile(f)})
        if not files:
            continue
        digest, whole = hashlib.sha256(), sum(os.path.getsize(f) for f in files) <= 256 << 20
        for f in files:
            digest.update(f"{f}\0{os.path.getsize(f)}\0".encode())
            if whole:
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
        out[f"files:{field}"] = digest.hexdigest()[:16]
    return out


def _data_settings(workdir: str, config, record: bool, stage=None) -> None:
    """WORKDIR/data/settings.json: the settings the stage's data there is made with,
    recorded (`record`: by the lead) before any of it is, so that a run killed while making
    it is covered too (a run that made nothing before it ended, refused or killed, leaves
    no data to compare: the next records its own). Made with others, a RunError naming
    them: a stage makes its data once and reuses it. Fields the record lacks (added to the
    code since) are not compared."""
    import json
    import os

    from llama_jax import distributed

    path = os.path.join(workdir, "data", "settings.json")
    now = _data_fields(config)
    if stage is not None and not stage.data_reads_init_from(config):  # toy data, prompts: not init_from's samples
        now.pop("init_from", None)
    # the lead's digest, on every process (hosts may hold their own copies of the data: each compares the same)
    now.update(distributed.allgather_json(_input_files(now) if jax.process_index() == 0 else {})[0])
    from llama_jax.workdir import made_data

    verdict = None  # the lead's: None (no data made yet: the settings are recorded), "" (made with these), or why not
    if jax.process_index() == 0 and os.path.exists(path) and made_data(os.path.dirname(path)):
        with open(path) as f:
            made = json.load(f)

        def same(k):  # init_from by another name (a symlink, a mount) is the same model
            return made[k] == now[k] or (k == "init_from" and isinstance(made[k], str) and isinstance(now[k], str)
                                         and os.path.realpath(made[k]) == os.path.realpath(now[k]))

        changed = sorted(k for k in made.keys() & now.keys() if not same(k))
        verdict = "" if not changed else (
            f"{os.path.dirname(path)} holds data made with other settings ("
            + ", ".join(f"the files {k[len('files:'):]} names (edited)" if k.startswith("files:") else
                        f"{k} {made[k]!r} -> {now[k]!r}" for k in changed[:6])
            + (", ..." if len(changed) > 6 else "") + "), which this stage would reuse, not make again: use a new "
            "--workdir, or remove that directory and checkpoints/ (if only paths moved with the workdir, remove "
            "data/settings.json)")
    # one collective every process calls, whatever it sees on its own disk: they refuse or go on alike (a process
    # that saw data the lead had just begun to make went on to a collective the lead never joined)
    verdict = distributed.allgather_json(verdict)[0]
    if verdict is None:
        if record:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(now, f, indent=1)
            os.replace(path + ".tmp", path)
        return
    if verdict:
        raise RunError(verdict)


def _record_config(config, cfg, workdir: str, start: int) -> None:
    """WORKDIR/config.json: the settings of the run's latest start, its model the one it
    trains (with `init_from`, the checkpoint's). A resume with other settings says which
    changed and keeps the earlier ones in config_history.jsonl (`until_step`: the step
    they trained up to)."""
    import json
    import os
    import sys

    from llama_jax.compare import flatten

    record = json.loads(config.to_json_best_effort())
    record["model"] = json.loads(json.dumps(cfg.to_dict()))
    path = os.path.join(workdir, "config.json")
    if start > 0 and os.path.exists(path):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError):
            before = {}
        flat_before, flat_now = flatten(before), flatten(record)
        changed = sorted(k for k in flat_before.keys() | flat_now.keys() if flat_before.get(k) != flat_now.get(k))
        if not changed:
            return
        print("resuming with changed settings: " + ", ".join(f"{k} {flat_before.get(k)!r} -> {flat_now.get(k)!r}"
                                                              for k in changed), file=sys.stderr, flush=True)
        with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
            f.write(json.dumps({"until_step": start, "config": before}) + "\n")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def _check_kept_checkpoints(config, workdir: str, steps) -> None:
    """A resume whose checkpoint.keep_period would delete the checkpoints the run's earlier
    setting kept for good (Orbax applies the retention to every step in the directory, at
    the next save) is refused: what was written is not lost to a forgotten flag."""
    import json
    import os

    try:
        with open(os.path.join(workdir, "config.json")) as f:
            before = int(json.load(f)["checkpoint"]["keep_period"] or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = int(config.checkpoint.keep_period or 0)
    lost = sorted(s for s in steps if before and s and s % before == 0 and not (now and s % now == 0))
    if lost:
        shown = ", ".join(map(str, lost[:8])) + (", ..." if len(lost) > 8 else "")
        raise RunError(f"{os.path.join(workdir, 'checkpoints')}: steps {shown} were kept by checkpoint.keep_period "
                       f"{before}, which this run's {now} would delete at its next saves; rerun with "
                       f"--config.checkpoint.keep_period={before} (or a divisor of it), or move those steps out of "
                       "the directory first")


def _check_not_a_model_directory(workdir: str) -> None:
    """A workdir without checkpoints that holds another program's model (a Hugging Face
    or Meta download, whose config.json a run would overwrite) is refused: it was meant
    as `init_from`, after an import."""
    import json
    import os

    from llama_jax import checkpoint as ckpt

    if not os.path.isdir(workdir):
        return
    foreign = ckpt.foreign_model(workdir, use="then pass DIR as --config.init_from")
    if foreign:
        raise RunError(f"--workdir {foreign}; a workdir is where a run writes")
    files = set(os.listdir(workdir))
    strange = sorted(f for f in files if f.endswith(ckpt.MODEL_FILES) or f in ("params.json", "config.json"))
    if "config.json" in files:
        try:
            with open(os.path.join(workdir, "config.json")) as f:
                if "stage" in json.load(f):  # a run's config.json; HF's has model_type, architectures
                    strange.remove("config.json")
        except (OSError, ValueError, TypeError):
            pass
    if strange:
        raise RunError(f"--workdir {workdir}: holds files of another program ({', '.join(strange[:4])}), not a "
                       "llama_jax run's; use a new or empty --workdir (a model to start from is --config.init_from, "
                       "after an import)")


def _check_stage_of_workdir(workdir: str, stage_name: str) -> None:
    """A workdir holds one stage's run: another stage would resume from its checkpoints
    (SFT, DPO and pretraining all have the LM head) with an input-pipeline state of
    another pipeline."""
    import os

    from llama_jax import checkpoint as ckpt
    from llama_jax import distributed

    # the lead's view, on every process: reading checkpoints is collective (Orbax), and the start-up probe of
    # another process may create checkpoints/ while this one looks
    if not distributed.allgather_json(os.path.isdir(os.path.join(workdir, "checkpoints")))[0]:
        _check_not_a_model_directory(workdir)
        return
    try:
        _, saved = ckpt.read_meta(workdir)
    except ckpt.CheckpointError:
        return  # none complete: the run starts afresh (restore_latest reports unreadable ones)
    from llama_jax.workdir import saved_steps

    if not any(os.path.isdir(os.path.join(workdir, "checkpoints", str(d), "train"))
               for d in saved_steps(workdir)):  # params, meta alone
        raise RunError(f"{workdir}: holds a params-only checkpoint (an import or an export), not a run; start from "
                       f"it with --config.init_from={workdir} and a new --workdir")
    if saved.get("stage", stage_name) != stage_name:
        raise RunError(f"{workdir}: holds checkpoints of stage {saved['stage']!r}, not {stage_name!r}; use a new "
                       f"--workdir (with --config.init_from={workdir} to start from that run)")


def check_config(config, stage) -> None:
    """The RunError of a setting no run could start with, from the config alone (no
    device, file or checkpoint read): the recipe checks every stage's before the first."""
    for field in ("total_steps", "log_every_steps", "checkpoint_every_steps", "batch_size", "seq_len",
                  "checkpoint.max_to_keep"):
        v = config[field] if "." not in field else config.checkpoint[field.split(".")[1]]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RunError(f"config.{field} must be a positive integer, got {v!r}")
    period = config.checkpoint.keep_period  # (Orbax would read -1 as "every step")
    if period is not None and (not isinstance(period, int) or isinstance(period, bool) or period < 0):
        raise RunError(f"config.checkpoint.keep_period must be an integer >= 0 (0 = none), got {period!r}")
    epochs = config.get("epochs", 0.0)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 <= epochs < float("inf"):
        raise RunError(f"config.epochs must be a number >= 0 (0 = config.total_steps decides), got {epochs!r}")
    if epochs and not stage.counts_epochs:
        raise RunError(f"config.epochs {epochs}: stage {config.stage}'s training data has no fixed size to count "
                       "passes over (a corpus, a prompt stream); set config.total_steps")
    try:  # an unknown schedule, a negative warmup or clip norm: one line now, not a traceback later
        make_optimizer(config.optimizer, config.total_steps)
    except ValueError as e:
        raise RunError(str(e)) from None
    stage.objective(config)  # its settings (dpo.beta, reward.safety_weight) are checked now
    stage.check(config)
    from llama_jax import configs

    try:  # the model's numerics (with init_from, its architecture comes from the checkpoint; these still apply)
        configs.to_llama_config(config.model)
    except ValueError as e:
        raise RunError(f"config.model: {e}") from None
    if not isinstance(config.eval_every_steps, int) or config.eval_every_steps < 0:
        raise RunError(f"config.eval_every_steps must be >= 0 (0 = only at the end), got {config.eval_every_steps!r}")
    EarlyStopping.from_config(config, stage.held_steps(config))  # evaluations, and checkpoints kept for the best
    if config.nonfinite_policy not in ("stop", "skip"):
        raise RunError(f"config.nonfinite_policy: {config.nonfinite_policy!r} is not 'stop' or 'skip'")
    if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 1 or \
            config.batch_size % config.grad_accum_steps:
        raise RunError(f"config.batch_size {config.batch_size} is not divisible by config.grad_accum_steps "
                       f"{config.grad_accum_steps}")
    from llama_jax import sharding

    try:
        sharding.normalize_rules(config.mesh.rules, complete=True)
    except sharding.MeshError as e:
        raise RunError(str(e)) from None


def unread_field(stage, key: str) -> bool:
    """Whether the config field `key` ("sample.prompt") is one `stage` never reads."""
    return any(key == u or (u.endswith(".") and key.startswith(u)) for u in stage.unread)


def check_overrides(config, stage, overrides: dict | None) -> None:
    """A RunError for a command-line override (`{"sample.prompt": ...}`) of a field the
    stage never reads (`stage.unread`) to another value than its family's default
    (`configs.base_config` for pretraining, `chat_config` for the rest): an ablation over
    it would give identical runs; flags shared by every stage's command may repeat a default."""
    from llama_jax import configs
    from llama_jax.stages import config_field

    default = configs.base_config() if config.stage == "pretrain" else configs.chat_config()
    for key, value in (overrides or {}).items():
        if unread_field(stage, key):
            try:
                known = config_field(default, key)
            except (KeyError, AttributeError):  # a field the family's base lacks: not a default
                known = None
            if value != known:
                raise RunError(f"--config.{key}={value}: stage {config.stage} does not read it (the run would ignore "
                               "it)")


def _meta_digest(meta: dict) -> str:
    """A checkpoint's identity short of its weights: its metadata (model, heads,
    tokenizer, stage, an import's source), without the step."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "step"}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


PHASE = ""  # "preparing": a stage making its data (sampling, scoring: not checkpointed); then "training"


def _run(config, workdir: str, stage, overrides: dict) -> dict:
    import json
    import os
    import sys
    import time

    from llama_jax import checkpoint as ckpt
    from llama_jax import distributed, metrics, sharding
    from llama_jax import workdir as workdir_lock
    from llama_jax.model import COMPUTE_ONLY_FIELDS

    for field, path in (("--workdir", workdir), ("config.init_from", config.init_from)):
        if "://" in str(path):  # else os.makedirs would make a local directory named like the URL
            raise RunError(f"{field} {path}: URLs are not read or written directly; mount the bucket (gcsfuse, as "
                           "launch/tpu_vm.sh does) and pass its local path")
    cfg = run_model(config, stage, overrides)
    check_config(config, stage)
    check_overrides(config, stage, overrides)
    try:  # the mesh, before a tokenizer is trained or a stage makes its data
        sharding.check_model_fits_mesh(cfg, sharding.run_mesh(config.mesh)[0])
    except sharding.MeshError as e:
        raise RunError(f"config.mesh: {e}") from None
    warning = warmup_warning(config)
    if warning and jax.process_index() == 0 and not config.get("epochs"):  # else once total_steps is known
        print(warning, flush=True)
    _check_stage_of_workdir(workdir, config.stage)  # before anything is written into it (the probe, the lock)
    for where in (workdir, os.path.join(workdir, "checkpoints")):  # checkpoints/ too: a whole interval's compute
        # would be lost at the first save
        probe = os.path.join(where, f".write_test.{jax.process_index()}")
        try:
            os.makedirs(where, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise RunError(f"workdir {workdir} is not writable: {e}") from None
    busy = None  # one run at a time in a workdir (the lead holds the lock; released by `run`)
    if jax.process_index() == 0:
        try:
            workdir_lock.lock(workdir)
        except workdir_lock.WorkdirBusy as e:
            busy = str(e)
    busy = distributed.allgather_json(busy)[0]  # every process refuses at once, not at its next collective
    if busy:
        raise RunError(busy)
    if config.batch_size % jax.process_count():
        raise RunError(f"config.batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
    if config.seq_len > cfg.max_seq_len:
        raise RunError(f"config.seq_len {config.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len} ("
                       + ("config.init_from's; a longer context: --config.model.max_seq_len" if config.init_from
                          else "config.model.max_seq_len") + ")")
    stopper = EarlyStopping.from_config(config, stage.held_steps(config))
    lead = jax.process_index() == 0

    for field, (path, head) in stage.model_paths(config).items():  # before any data is made with them
        try:
            heads = list(ckpt.read_meta(path)[1].get("heads", ["lm"]))
        except ckpt.CheckpointError as e:
            raise RunError(f"config.{field}: {e}") from None
        if head not in heads:
            raise RunError(f"config.{field} {path}: has heads {heads}, not the {head!r} head this stage reads ("
                           + ("a reward model" if head == "score" else "a language model") + ")")
    if stage.writes_data:  # WORKDIR/data of an earlier start must be of these settings; recorded before it is made
        _data_settings(workdir, config, record=lead, stage=stage)
    stage.run_config = cfg  # what a stage that samples first (prepare) samples at: the run's context
    if config.init_from:  # the step the run starts from, which a resume keeps (DPO's and PPO's reference); the
        # lead's reading, so that every process starts from the same one while init_from's run saves new steps
        # (every process reads it: opening a checkpoint directory is collective in a multi-process job); read
        # before prepare, so that a stage that samples from init_from first samples the step it then trains
        init_step, init_meta = ckpt.read_meta(config.init_from)
        stage.init_step, init_sha, init_trained = distributed.allgather_json(
            [init_step, _meta_digest(init_meta), init_meta.get("trained_seq_len")])[0]
    global PHASE
    PHASE = "preparing"  # what an interruption now loses (main says it)
    stage.prepare(config, workdir)
    PHASE = "training"
    tokenizer = stage.tokenizer(config, workdir)
    tokenizer.check_fits(cfg.vocab_size, "config.model")
    mesh, rules = sharding.run_mesh(config.mesh)
    sharding.check_model_fits_mesh(cfg, mesh)
    shards, procs = sharding.batch_shards(mesh, rules), jax.process_count()
    if procs > 1 and (shards % procs or config.batch_size % shards):
        # else the batch is replicated (or shared) across processes that each read their own rows: every
        # process would train on its own rows alone, and the processes' weights would drift apart
        if shards % procs:  # the batch axis does not span the processes: tensor (model) parallel across them
            raise RunError(f"config.mesh: the batch axis (data x fsdp) has {shards} shard{'s' * (shards > 1)}, which "
                           f"the {procs} processes cannot split (each process reads rows of its own): make data x "
                           f"fsdp a multiple of {procs}, with config.mesh.tensor ({config.mesh.tensor}) within one "
                           "process's devices")
        raise RunError(f"config.batch_size {config.batch_size} must be divisible by the {shards} shards of the "
                       "batch axis (config.mesh data x fsdp)")
    micro = config.batch_size // config.grad_accum_steps
    if micro % shards and lead:
        print(f"warning: the micro-batch of {micro} rows (config.batch_size / config.grad_accum_steps) does not "
              f"split over the {shards} shards of the batch axis (config.mesh data x fsdp): every device computes "
              f"all {micro} rows; a multiple of {shards} uses the devices", flush=True)
    train_data = stage.train_data(config, tokenizer)
    described = getattr(train_data, "description", None)
    if described and lead:  # what the run reads, counted (pairs dropped by the paper's filter included)
        print("training data: " + ", ".join(f"{k} {v:,}" if type(v) is int else f"{k} {v}"  # pack True, not 1
                                            for k, v in described.items()), flush=True)
    per_epoch = getattr(train_data, "rows_per_epoch", None)
    if config.get("epochs") and "total_steps" in (overrides or {}):  # the command line's: it wins over a preset's
        if "epochs" in overrides:
            train_data.close()
            raise RunError("--config.epochs and --config.total_steps both given: set one (epochs sets total_steps "
                           "from the data)")
        if lead:
            print(f"note: --config.total_steps {config.total_steps} given: the preset's config.epochs "
                  f"{config.epochs:g} is not used", flush=True)
        config.epochs = 0.0
    if config.get("epochs"):  # total_steps from the data, before the optimizer's schedule is made of it
        if not per_epoch:
            train_data.close()
            raise RunError(f"config.epochs {config.epochs}: stage {config.stage}'s training data has no fixed size "
                           "to count passes over (a corpus or a prompt stream); set config.total_steps")
        config.total_steps = max(1, math.ceil(config.epochs * per_epoch / config.batch_size))
        warning = warmup_warning(config)
        if warning and lead:
            print(warning, flush=True)
    if per_epoch and lead:  # what total_steps means for one's own data
        about = "about " if train_data.estimated else ""
        print(f"epochs: total_steps {config.total_steps:,}" + (f" (config.epochs {config.epochs:g})"
                                                              if config.get("epochs") else "")
              + f" x batch_size {config.batch_size:,} rows = {about}"
              f"{config.total_steps * config.batch_size / per_epoch:,.3g} passes over the training data ({about}"
              f"{per_epoch:,.0f} rows each" + (f", its dialogs packed into rows of seq_len {config.seq_len}"
                                              if train_data.estimated else "") + ")", flush=True)
    plan = build_step(config, cfg, stage, mesh, rules)
    model, apply_fn, optimizer = plan.model, plan.apply_fn, plan.optimizer
    note = sharding.replication_note(model, mesh, rules)
    if note and lead:
        print(f"warning: {note}", flush=True)
    param_sh, state_sh, abstract_sharded = plan.param_sh, plan.state_sh, plan.abstract_state

    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint.max_to_keep, config.checkpoint.keep_period,
                                     config.checkpoint.async_save)
    meta = {"model": cfg.to_dict(), "heads": list(stage.heads), "tokenizer": tokenizer.identity(),
            "stage": config.stage,
            # the longest rows the weights have trained on, init_from's included (an export keeps it: evaluate, chat)
            "trained_seq_len": max(int(config.seq_len), int(init_trained or 0) if config.init_from else 0),
            # the run's id: another run's checkpoint here has another metadata digest
            "run": distributed.allgather_json(workdir_lock.run_id(workdir) if lead else "")[0]}
    if config.init_from:  # (its step, read before prepare)
        meta["init_from"] = {"path": os.path.abspath(config.init_from), "step": stage.init_step, "meta_sha": init_sha}
    held_out = stage.eval_data(config, tokenizer) if config.eval_steps else None
    if held_out is None and config.eval_steps and stage.held_out_source and not config.data.eval_source and lead:
        print("note: config.data.eval_source is empty: no held-out loss (eval_loss, and what the stage computes "
              "on held-out data of the training data's format); set it to such a file to get them", flush=True)
    if held_out is not None and lead and "unread_fields" in held_out.description:
        print(f"note: held-out data: unread_fields {held_out.description['unread_fields']}", flush=True)
    if held_out is not None:  # its files are checked now, not at the first evaluation, mid-run
        try:  # every process, together: a process out of batches scores empty rows while another has one
            has = distributed.allgather_json(next(held_out, None) is not None)
            lacking = [i for i, h in enumerate(has) if not h]
            if lacking and lead:
                print(f"warning: the held-out data gives no full batch of {stage.local_batch(config)} rows to "
                      + ("this process" if jax.process_count() == 1 else f"processes {lacking}")
                      + (", so there will be no evaluation (a smaller batch_size, or more held-out data)"
                         if not any(has) else " (they score rows that weigh nothing while the others evaluate)"),
                      file=sys.stderr, flush=True)
        finally:
            held_out.close()

    def check_meta(saved_meta: dict) -> None:
        diff = ckpt.model_fields_differing(saved_meta.get("model", {}), meta["model"], ignore=COMPUTE_ONLY_FIELDS)
        if diff:
            longer = diff == ["max_seq_len"]  # the same weights: a longer context goes on from them in a new run
            raise RunError(f"{checkpointer.directory}: its checkpoints are of another model (fields {diff} differ);"
                           " use a new --workdir or the original config"
                           + (f" (for a longer context, a new --workdir with --config.init_from={workdir} and "
                              f"--config.model.max_seq_len={meta['model']['max_seq_len']})" if longer else ""))
        changed = ckpt.model_fields_differing(saved_meta.get("model", {}), meta["model"])
        if changed and lead:  # numerics only (COMPUTE_ONLY_FIELDS): the same weights, computed otherwise
            saved = ckpt.model_config(saved_meta).to_dict()
            print("resuming with other numerics than the checkpoint's run: "
                  + ", ".join(f"{k} {saved[k]!r} -> {meta['model'][k]!r}" for k in changed),
                  file=sys.stderr, flush=True)
        if saved_meta.get("tokenizer", {}).get("sha256") != meta["tokenizer"]["sha256"]:
            raise RunError(f"{checkpointer.directory}: its checkpoints were trained with another tokenizer")
        if list(saved_meta.get("heads", ["lm"])) != meta["heads"]:
            raise RunError(f"{checkpointer.directory}: its checkpoints have heads {saved_meta.get('heads')} (stage "
                           f"{saved_meta.get('stage')!r}), this stage trains {meta['heads']}; use a new --workdir")
        # a resume at a shorter seq_len keeps the longest rows its weights trained on before
        meta["trained_seq_len"] = max(meta["trained_seq_len"], int(saved_meta.get("trained_seq_len") or 0))
        began = saved_meta.get("init_from") or {}
        if config.init_from and began.get("path") not in (None, meta["init_from"]["path"]):  # another init_from
            if not stage.rereads_init_from:  # read at the start only (config_history.jsonl has the change)
                return
            # the one it began with, here: the same path by another name (a symlink, a mount), or its step here with
            # the same metadata, which names the run that saved it (a copy), or is gone from there (moved); the
            # lead's view of the paths, so that every process decides alike (and reads init_from below, together)
            same, gone = distributed.allgather_json(
                [os.path.realpath(began["path"]) == os.path.realpath(config.init_from),
                 not os.path.exists(began["path"])] if lead else None)[0]
            try:
                here = ckpt.read_meta(config.init_from, began["step"])[1]
            except ckpt.CheckpointError:
                here = None
            copy = here is not None and began.get("meta_sha") == _meta_digest(here) and ("run" in here or gone)
            if not (same or copy):
                raise RunError(f"config.init_from {config.init_from}: this run began from {began['path']} (its step "
                               f"{began['step']}), the reference it trains against; resuming from another would "
                               f"change its objective mid-run: resume with --config.init_from={began['path']}, or "
                               "use a new --workdir")
            if lead and not same:
                print(f"config.init_from {config.init_from}: its step {began['step']} has the metadata of the "
                      f"checkpoint this run began from ({began['path']}, "
                      + ("gone: moved here" if gone else "a copy") + "): taken as that checkpoint",
                      file=sys.stderr, flush=True)
            began = {**began, "path": meta["init_from"]["path"]}
        if config.init_from and began.get("step") not in (None, stage.init_step):  # init_from trained on since
            if stage.rereads_init_from:  # its run trained on: the reference stays the step the run began with
                try:
                    ckpt.read_meta(config.init_from, began["step"])
                except ckpt.CheckpointError:
                    raise RunError(f"config.init_from {config.init_from}: this run started from its step "
                                   f"{began['step']}, which it no longer holds (its latest: {stage.init_step}); the "
                                   "reference the run trains against is gone: use a new --workdir to start from the "
                                   "latest") from None
                if lead:
                    print(f"config.init_from {config.init_from}: now at step {stage.init_step}; this run started "
                          f"from its step {began['step']} and goes on with it", file=sys.stderr, flush=True)
            stage.init_step = meta["init_from"]["step"] = began["step"]  # the record keeps the step begun with
            # and the digest of that step (a stage that reads init_from only at its start keeps the record's: the
            # step may be gone)
            meta["init_from"]["meta_sha"] = _meta_digest(ckpt.read_meta(config.init_from, began["step"])[1]) \
                if stage.rereads_init_from else began.get("meta_sha")
        if config.init_from and stage.rereads_init_from and began.get("meta_sha") and \
                began.get("path") == meta["init_from"]["path"]:  # the same step, rewritten (imported again)?
            now = _meta_digest(ckpt.read_meta(config.init_from, began["step"])[1])
            if now != began["meta_sha"]:
                raise RunError(f"config.init_from {config.init_from}: its step {began['step']} is not the checkpoint "
                               "this run began with (its metadata differs: written again since, e.g. imported from "
                               "another model); the reference the run trains against is gone: use a new --workdir")
            meta["init_from"]["meta_sha"] = now

    restored = checkpointer.restore_latest(abstract_sharded, check_meta,
                                          log=lambda m: lead and print(m, file=sys.stderr, flush=True))
    if restored is not None:
        start, state, data_state, _ = restored
        _restore_data(train_data, data_state, start, lead)
        if stopper is not None:
            stopper.load(data_state.get("early_stopping"))
        if int(state.step) != start and start < config.total_steps and not (stopper and stopper.reason):
            # early stopping saved an earlier step's state as its last step: its optimizer is at that step
            raise RunError(f"{checkpointer.directory}: checkpoint {start} holds step {int(state.step)}'s weights and "
                           "optimizer state, which early stopping returned to at the end of its run; training on "
                           "from it would rerun that step's schedule: start a new run from these weights with "
                           f"--config.init_from={workdir} and a new --workdir")
        if start > config.total_steps:  # what it would add would be rows before the ones already logged
            raise RunError(f"{checkpointer.directory}: its latest checkpoint is step {start}, past config.total_steps "
                           f"{config.total_steps}; use a new --workdir (or --config.init_from={workdir}) to run "
                           "fewer steps")
        if start < config.total_steps:  # a rerun that saves: the checkpoints it would delete
            _check_kept_checkpoints(config, workdir, checkpointer.manager.all_steps())
        if lead:
            print(f"resumed from step {start} in {workdir}", flush=True)
    else:
        start = 0
        params = stage.initial_params(config, model, mesh, rules, param_sh)
        state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_sh)(params)

    stage.runtime = types.SimpleNamespace(model=model, mesh=mesh, rules=rules, tokenizer=tokenizer, workdir=workdir,
                                          param_sh=param_sh)
    objective, batch_sh = plan.objective, plan.batch_sh
    frozen, frozen_sh = stage.frozen_params(config, model, param_sh)
    train_step = jit_train_step(plan.step_fn, state_sh, batch_sh, mesh, rules, frozen_sh)
    eval_fn = jax.jit(make_eval_step(apply_fn, objective), in_shardings=(param_sh, batch_sh, frozen_sh),
                      out_shardings=NamedSharding(mesh, P()))

    noted_partial: list[bool] = []

    def evaluate(params, phase: str) -> dict:
        stage.eval_phase = phase
        out: dict = {}
        data = stage.eval_data(config, tokenizer)
        if data is not None:
            with sharding.activate(mesh, rules):
                total, weight, sums, batches = held_out_sums(
                    data, config.eval_steps, empty_batch(plan.abstract_batch, stage.local_batch(config)),
                    lambda b: eval_fn(params, _global_batch(b, batch_sh), frozen))
            if batches and batches == config.eval_steps and not noted_partial:  # said once: what it covers
                noted_partial.append(True)
                if any(distributed.allgather_json(next(data, None) is not None)) and lead:
                    print(f"note: an evaluation reads the first {batches} batches of the held-out data, in file "
                          "order, not all of it: later files are never evaluated; "
                          "raise config.eval_steps to cover them, or evaluate the whole set with python -m "
                          "llama_jax.evaluate", flush=True)
            data.close()
            if weight:
                out = {"eval_loss": total / weight, **{f"eval_{k}": v / weight for k, v in sums.items()}}
        gen_rules = rules
        if config.mesh.gather_for_generation and stage.samples_in_evaluation(config):
            gather, gen_rules = gather_for_eval()
            params = gather(params)  # a copy whole on each FSDP group while the evaluation samples
        out.update(stage.evaluate_extra(config, model, params, tokenizer, mesh, gen_rules, dict(out)))
        return out

    @functools.cache
    def gather_for_eval():
        return sharding.gather_for_generation(model, mesh, rules)

    if config.mesh.gather_for_generation and stage.samples_in_evaluation(config):
        gather_for_eval()  # a copy that cannot fit is an error now, not after training

    try:  # a fresh start keeps no row of a run killed before its first checkpoint
        writer = metrics.MetricsWriter(workdir, resume_step=start if restored is not None else -1, enabled=lead)
    except ValueError as e:
        raise RunError(str(e)) from None
    progress = metrics.Progress(config.total_steps, start, enabled=lead)
    peak = metrics.peak_flops_per_device(config.metrics.peak_flops_per_device)
    if lead and not config.metrics.peak_flops_per_device and jax.devices()[0].platform == "cpu":
        print(f"mfu: against this CPU's float32 matmul peak, measured now: {peak / 1e9:.1f} GFLOP/s per device "
              "(it moves with the machine's load; config.metrics.peak_flops_per_device fixes it)", flush=True)
    flops_per_token = stage.flops_per_token(cfg, config.seq_len)  # its heads (and DPO's reference forward)

    def mfu(tokens_per_second: float) -> float:
        return flops_per_token * tokens_per_second / (jax.device_count() * peak) if peak else 0.0

    schedule = stage.learning_rates(config).get("*") or learning_rate_schedule(config.optimizer, config.total_steps)
    tokens_per_step = config.batch_size * config.seq_len * stage.rows_per_example
    if lead and start < config.total_steps:  # a finished run trains nothing: its record stays what it ran
        _record_config(config, cfg, workdir, start)
        # a finished run given more steps is unfinished until they are done (compare, the recipe and `began` read
        # the file as "finished"); its numbers are in metrics.jsonl, and the new finish writes the file again
        if os.path.exists(os.path.join(workdir, "final_metrics.json")):
            os.remove(os.path.join(workdir, "final_metrics.json"))

    pending: list[tuple[int, dict]] = []
    last_log_time, last_log_step = time.perf_counter(), start
    final: dict = {}
    rates: list[float] = []  # tokens/s of each log interval, for the run's median

    def check_nonfinite(step: int, m: dict) -> None:
        if bool(m["nonfinite"]) and config.nonfinite_policy == "stop":
            checkpointer.wait()
            latest = checkpointer.latest_step()
            raise RunError(f"non-finite loss or gradient at step {step} (the batch of step {step}; loss "
                           f"{float(m['loss'])}); the update was not applied. "
                           + (f"Last checkpoint: step {latest}. " if latest is not None else "No checkpoint yet. ")
                           + "A loss non-finite from the first step is a setting (learning rate, a NaN coefficient); "
                           "a rare bad batch can be skipped with --config.nonfinite_policy=skip.")

    def save(step: int, force: bool = False) -> None:
        data_state = {"processes": distributed.allgather_json(train_data.state()), "data": _data_counts(train_data)}
        extra = {}
        if stopper is not None:  # in the data state to resume it, in meta for whoever reads the checkpoint
            data_state["early_stopping"] = extra["early_stopping"] = stopper.state()
        checkpointer.save(step, state, data_state, {**meta, **extra}, force=force)

    def write_log_row(step: int) -> None:
        """Writes the row of the steps since the last one (`pending`), checked for non-finite values."""
        nonlocal pending, last_log_time, last_log_step, final
        check_nonfinite(*pending[-1])
        rows = [jax.device_get(x) for _, x in pending]
        now = time.perf_counter()
        batch_seconds = stage.take_batch_seconds()  # PPO's rollouts: not training throughput
        tps = tokens_per_step * (step - last_log_step) / max(now - last_log_time - batch_seconds, 1e-9)
        final = {
            "loss": float(np.mean([r["loss"] for r in rows])),
            # skipped (non-finite) steps do not advance the optimizer's count, nor its schedule: the
            # rate this step applied (or, skipped, would have)
            "learning_rate": float(schedule(step - 1 - int(state.nonfinite) + int(rows[-1]["nonfinite"]))),
            "grad_norm": float(np.mean([r["grad_norm"] for r in rows])),
            "tokens_per_second": tps,
            "mfu": mfu(tps),
            "nonfinite_steps": int(state.nonfinite),
            **({"batch_seconds": batch_seconds} if batch_seconds else {}),
            **{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in
               ("loss", "grad_norm", "weight", "nonfinite")},
        }
        final.update(stage.log_metrics())
        writer.write(step, final)
        rates.append(tps)
        progress.update(step, loss=final["loss"], lr=final["learning_rate"],
                        tok_s=final["tokens_per_second"], mfu=final["mfu"])
        pending, last_log_time, last_log_step = [], time.perf_counter(), step

    preemption = distributed.Preemption()
    try:
        # the numbers before any update (not again when resuming from the step-0 checkpoint early stopping saves)
        if restored is None and (stopper is not None or stage.evaluate_at_start):
            ev = evaluate(state.params, "start")
            if ev:
                writer.write(0, ev)
                progress.message("eval at step 0: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
            if stopper is not None:
                stopper.observe(0, ev)
                save(0, force=True)  # the weights to return to if no evaluation beats them
            # the first row's throughput, and the ETA, exclude this one-off evaluation (PPO's, early stopping's
            # could take minutes: the ETA read them as the first steps' time)
            last_log_time = progress.t0 = time.perf_counter()
        step, noticed, last_eval = start, False, None
        last = start if stopper is not None and stopper.reason else config.total_steps  # killed after stopping
        for step in range(start + 1, last + 1):
            try:
                batch = stage.next_batch(train_data, state)
            except StopIteration:
                raise RunError(f"the training data ran out at step {step}") from None
            state, m = train_step(state, _global_batch(batch, batch_sh), frozen)
            pending.append((step, m))
            if len(pending) > 1:  # check the previous step while this one runs
                check_nonfinite(*pending[-2])
            noticed = preemption.reached(step) or noticed  # asked every step, as JAX's sync point needs
            # saved and stopped at the first step the stage can resume from; the last step: the run finishes
            preempted = noticed and step < config.total_steps and stage.can_stop_after(config, step)
            periodic = step % config.checkpoint_every_steps == 0 or step == config.total_steps
            # a checkpoint's step also ends a log interval, so that a run resumed from it logs the same rows
            if step % config.log_every_steps == 0 or periodic or preempted:
                write_log_row(step)
            best = False
            if config.eval_every_steps and step % config.eval_every_steps == 0 and (
                    step != config.total_steps or stopper is not None):
                eval_start = time.perf_counter()
                ev = evaluate(state.params, "during")
                if step == config.total_steps:
                    last_eval = ev  # (early stopping's: of the last step's weights, which the run may end on)
                if ev:
                    writer.write(step, ev)
                    progress.message(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                if stopper is not None:
                    best = stopper.observe(step, ev, counts=step > stage.held_steps(config))
                last_log_time += time.perf_counter() - eval_start  # throughput excludes evaluation
            if stopper is not None and step == config.total_steps:
                periodic = False  # the last step holds the best weights, saved below
            if best or periodic or preempted:
                save(step, force=best or preempted or step == config.total_steps)
            if preempted:
                checkpointer.wait()
                raise Preempted(f"preempted (SIGTERM) at step {step}: checkpoint {step} saved in {workdir}; rerun "
                                "the same command to resume")
            if stopper is not None and stopper.reason:
                if pending:  # the steps since the last row: written (and checked) before the loop ends
                    write_log_row(step)
                progress.message(f"early stopping at step {step}: {stopper.reason}")
                break
        # why the run ended, for its final metrics; not the stopper's reason, which the last checkpoint keeps: a
        # run that ran all its steps has not decided to stop, and a rerun with more steps trains on
        stopped = stopper.reason if stopper is not None and stopper.reason else f"ran all {config.total_steps} steps"
        if stopper is not None and stopper.best_step is not None and start < config.total_steps:
            # The run ends on its best evaluation's weights, saved as the last step so that
            # resuming finds it finished and init_from / export read these weights.
            checkpointer.wait()
            if stopper.best_step != step:
                state = checkpointer.restore(stopper.best_step, abstract_sharded)[0]
            progress.message(f"early stopping keeps step {stopper.best_step} ({stopper.metric} {stopper.best:.4g})"
                             + (f", saved as step {config.total_steps}" if stopper.best_step != config.total_steps
                                else ""))
            if stopper.best_step != config.total_steps:
                save(config.total_steps, force=True)
        checkpointer.wait()
        # the training is saved: a notice from here on ends the process (the rerun redoes what follows)
        preemption.close()
        finished_before = start >= config.total_steps
        if finished_before:  # a rerun of a finished run, or one killed after its last step: the logged numbers
            logged = [r for r in writer.rows if "loss" in r]
            final = {k: v for k, v in (logged[-1] if logged else {}).items() if k != "step"}
            rates = [r["tokens_per_second"] for r in logged if "tokens_per_second" in r]
        kept_last = stopper is not None and stopper.best_step == config.total_steps
        ev = evaluate(state.params, "end")  # (a stage may add to it what it left out during training: PPO's held-out)
        if ev:
            # the run ends on the last step's weights, evaluated at that step already: its row has those numbers
            logged = last_eval if kept_last and last_eval is not None else {}
            fresh = {k: v for k, v in ev.items() if k not in logged}
            recorded = finished_before and any(r["step"] == config.total_steps and set(ev) & set(r)
                                               for r in writer.rows)
            if fresh and not recorded:  # a rerun adds it only if the kill came before it was written
                # early stopping's returned weights, logged at the last step: the row names the step they are of
                kept = {} if stopper is None or kept_last or stopper.best_step is None else {
                    "early_stopping_kept_step": stopper.best_step}
                writer.write(config.total_steps, {**fresh, **kept})
            final.update(ev)
            progress.message("final eval: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items())
                             + (" (of a finished run: printed, not recorded; its record keeps the evaluation it ran)"
                                if recorded else ""))
        if rates:  # the first interval holds the compilation: left out when there are others
            final["median_tokens_per_second"] = float(np.median(rates[1:] or rates))
            final["median_mfu"] = mfu(final["median_tokens_per_second"])
            final["peak_flops_per_device"] = peak  # what this start's MFU numbers are a fraction of
        if stopper is not None and stopper.best_step is not None:
            final.update(early_stopping_best_step=stopper.best_step, early_stopping_best=stopper.best,
                         early_stopping_reason=stopped)
        final_path = os.path.join(workdir, "final_metrics.json")
        if finished_before and os.path.exists(final_path):  # a rerun of a finished run: keep its numbers
            with open(final_path) as f:
                final = {**json.load(f), **{k: v for k, v in final.items() if k.startswith("early_stopping")}}
        elif lead:
            with open(final_path, "w") as f:
                json.dump(final, f, indent=1)
        stage.after_training(config, workdir, model, state.params, tokenizer, progress)
    finally:
        preemption.close()
        train_data.close()
        checkpointer.close()
        writer.close()
    return final
