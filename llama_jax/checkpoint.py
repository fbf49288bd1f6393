"""Orbax checkpoints that describe themselves.

A run's workdir holds `checkpoints/<step>/` with four items:
  params  the model parameters (sharded arrays; restored onto any mesh)
  train   optimizer state, step, non-finite counter
  data    the input pipeline's iterator state (JSON)
  meta    {"model": LlamaConfig fields, "heads": [...], "tokenizer": identity, "step": N}
and `tokenizer.model`. Saves are asynchronous; Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save restarts from the last
complete step. `keep` = the last `max_to_keep` plus every `keep_period`-th step.

A params-only export (`python -m llama_jax.checkpoint export --workdir=RUN --output=DIR`)
has the same layout with only `params` and `meta`: everything that loads a model for
inference or initialises a stage from it (`init_from`) accepts either.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.model import LlamaConfig

ITEMS = ("params", "train", "data", "meta")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory and the problem."""


def _agreed(error: Exception | None) -> str | None:
    """None when every process read its part; else the first failing process's error
    (its first line, prefixed with the process in a multi-process job), on every process:
    collective, so that all take the same step."""
    from llama_jax import distributed

    said = distributed.allgather_json(None if error is None else _first_line(error))
    failed = [(i, m) for i, m in enumerate(said) if m is not None]
    if not failed:
        return None
    return failed[0][1] if len(said) == 1 else f"process {failed[0][0]}: {failed[0][1]}"


def _first_line(err: BaseException) -> str:
    """The error's first line, shortened in the middle: the cause (e.g. "No space left on
    device") is usually at the end of Orbax's and TensorStore's long messages."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    if len(line) > 300:
        line = line[:120] + " ... " + line[-160:]
    code = re.search(r"os_error_code='?(\d+)", str(err))  # TensorStore's errno: name it even if cut above
    if code and os.strerror(int(code.group(1))) not in line:
        line += f" [{os.strerror(int(code.group(1)))}]"
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


class _ReadOnlyNotes(logging.Filter):
    """Orbax warns, twice per manager, that a read-only manager is read-only (inference
    opens several): what was asked for, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("CheckpointManagerOptions.read_only=True")
                    or message.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_ReadOnlyNotes())


class _QuietOrbax(logging.Filter):
    """Orbax's warnings describe its own defaults, not problems; its failures reach the
    caller as exceptions, reported once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or "orbax" not in record.pathname


def quiet_orbax() -> None:
    """For commands (main, and the CLIs that read or write checkpoints): Orbax's log lines
    and, after a failed read or write, TensorStore's late callbacks into Orbax's closed
    event loop are not shown; the error itself is reported once, as one line."""
    from absl import logging as absl_logging

    for handler_or_logger in (absl_logging.get_absl_handler(), logging.getLogger("absl")):
        if not any(isinstance(f, _QuietOrbax) for f in handler_or_logger.filters):
            handler_or_logger.addFilter(_QuietOrbax())
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if getattr(sys.unraisablehook, "quiets_closed_loops", False):
        return
    default_hook = sys.unraisablehook

    def quiet_closed_loop(info):
        if not (isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)):
            default_hook(info)

    quiet_closed_loop.quiets_closed_loops = True
    sys.unraisablehook = quiet_closed_loop


def _manager(directory: str, max_to_keep: int | None = None, keep_period: int | None = None,
             async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period or None, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class Checkpointer:
    """Saves and restores a run's checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str, max_to_keep: int = 3, keep_period: int = 0, async_save: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        self.manager = _manager(self.directory, max_to_keep, keep_period, async_save)
        self._pending: int | None = None  # the step of a save that may still be running

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Starts an (asynchronous) save of `step`. A failure of this save or of the
        previous asynchronous one (disk full, unwritable) is a CheckpointError naming the
        step and the last complete checkpoint; Orbax renames a step's directory only
        once it is complete, so a failed save never looks like a checkpoint."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                         "nonfinite": state.nonfinite}),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        if self._pending is not None:  # Orbax would wait for it anyway; this way its error names its step
            self.wait()
        self._pending = int(step)
        with self._failures(int(step)):
            saved = self.manager.save(int(step), args=args, force=force)
        if not saved:
            self._pending = None
        return saved

    @contextlib.contextmanager
    def _failures(self, step: int):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - disk full, permissions, orbax's own errors
            self._pending = None
            try:
                self.manager.reload()
                last = self.manager.latest_step()
            except Exception:  # noqa: BLE001
                last = None
            raise CheckpointError(f"{self.directory}: saving checkpoint {step} failed ({_first_line(e)}); the last "
                                  f"complete checkpoint is {'step ' + str(last) if last is not None else 'none'}"
                                  ) from None

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, meta) at `step` onto the shardings carried by
        `abstract_state` (a TrainState of ShapeDtypeStructs with `.sharding`)."""
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                                            "nonfinite": abstract_state.nonfinite}),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        train = restored["train"]
        state = type(abstract_state)(step=train["step"], params=restored["params"], opt_state=train["opt_state"],
                                     nonfinite=train["nonfinite"])
        return state, restored["data"], restored["meta"]

    def restore_latest(self, abstract_state, check_meta: Callable[[dict], None] | None = None,
                       log: Callable[[str], None] = print) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint that reads back, or
        None if there is none. `check_meta(meta)` runs before the arrays are read and may
        raise (a workdir of another model is the user's error, not a corrupt checkpoint).
        A checkpoint that cannot be read is reported, moved to `checkpoints_unreadable/`
        (kept, not deleted) and the previous one is tried. In a multi-process job every
        process takes the same step: one that one process cannot read (its own part of
        the arrays damaged) is unreadable for all, with that process's error."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            error = None
            try:
                meta = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - orbax raises several types for missing/corrupt items
                error = e
            error = _agreed(error)
            if error is None:
                if check_meta is not None:
                    check_meta(meta)
                try:
                    restored = self.restore(step, abstract_state)
                except Exception as e:  # noqa: BLE001
                    error = e
                error = _agreed(error)
                if error is None:
                    self.set_aside([s for s, _ in failures])
                    return (step, *restored)
            failures.append((step, error))
            older = [s for s in steps if s < step]
            log(f"warning: checkpoint {step} in {self.directory} is unreadable ({error}); "
                + (f"falling back to checkpoint {older[0]}" if older else "no older checkpoint"))
        if failures:
            raise CheckpointError(f"{self.directory}: no readable checkpoint (tried steps "
                                  f"{', '.join(str(s) for s, _ in failures)}); the directories are kept as they are")
        return None

    def set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints out of the way (to `checkpoints_unreadable/<step>`),
        so that training can save those steps again; nothing is deleted."""
        if not steps:
            return
        if jax.process_index() == 0:
            dest = self.directory + "_unreadable"
            os.makedirs(dest, exist_ok=True)
            for step in steps:
                target = os.path.join(dest, str(step))
                if os.path.exists(target):
                    target += f".{len(os.listdir(dest))}"
                shutil.move(os.path.join(self.directory, str(step)), target)
        from llama_jax import distributed

        distributed.barrier("checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        step, self._pending = self._pending, None
        if step is None:
            self.manager.wait_until_finished()
            return
        with self._failures(step):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - a failed background save surfaces here at the latest
            raise CheckpointError(f"{self.directory}: finishing the last save failed ({_first_line(e)})") from None


# ----------------------------------------------------------------------------------
# Loading params from a run or an export
# ----------------------------------------------------------------------------------


def _checkpoint_dir(path: str) -> str:
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints")
    return path


MODEL_FILES = (".safetensors", ".bin", ".pth")  # the weights of Hugging Face's and Meta's layouts


def foreign_model(path: str, use: str = "then use DIR") -> str | None:
    """What to do with a Hugging Face or Meta model directory given where a llama_jax
    checkpoint belongs (None for any other directory): import it first, then `use` it."""
    files = set(os.listdir(path))
    kind = "hf" if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files) else \
        "meta" if "params.json" in files and any(f.endswith(".pth") for f in files) else None
    if not kind:
        return None
    pickles = kind == "hf" and not any(f.endswith(".safetensors") for f in files)
    return (f"{path}: a {'Hugging Face' if kind == 'hf' else 'Meta'} model directory, not a llama_jax checkpoint; "
            f"import it first: python -m llama_jax.convert --from={kind} --src={path} --dst=DIR, {use}"
            + (" (its weights are PyTorch pickles, which convert does not load: save them as safetensors first)"
               if pickles else ""))


def read_meta(path: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the latest (or given) checkpoint of a run dir or export."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: " + ("not a directory" if os.path.exists(path) else
                                             "no such directory (a run's workdir or an export)"))
    mngr = _manager(_checkpoint_dir(path), read_only=True)
    try:
        if step is not None and step not in mngr.all_steps():
            raise CheckpointError(f"{path}: has no checkpoint {step}; its checkpoints: {sorted(mngr.all_steps())}")
        step = mngr.latest_step() if step is None else step
        if step is None:
            parent = os.path.dirname(os.path.abspath(path))
            if os.path.basename(os.path.abspath(path)).isdigit() and os.path.basename(parent) == "checkpoints":
                run, n = os.path.dirname(parent), os.path.basename(os.path.abspath(path))
                raise CheckpointError(f"{path}: one step of the run {run}, which is what to pass (its latest step); "
                                      f"for step {n}: python -m llama_jax.checkpoint export --workdir={run} --step={n} "
                                      f"--output=DIR, then DIR")
            foreign = foreign_model(path)
            if foreign:
                raise CheckpointError(foreign)
            raise CheckpointError(f"{path}: no complete checkpoint found")
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises several types for missing/corrupt items
            raise CheckpointError(f"{path}: checkpoint {step} has no readable metadata ({e})") from None
    finally:
        mngr.close()
    return step, meta


def load_params(path: str, abstract_params, step: int | None = None):
    """Params of a run dir or export, restored onto the shardings of `abstract_params`
    (ShapeDtypeStructs with `.sharding`). Shapes must match exactly."""
    step, _ = read_meta(path, step)
    mngr = _manager(_checkpoint_dir(path), read_only=True)
    try:
        return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]
    except Exception as e:  # noqa: BLE001 - orbax raises several types for corrupt or mismatched params
        others = sorted(s for s in mngr.all_steps() if s != step)
        raise CheckpointError(f"{path}: cannot restore the params of checkpoint {step}, unreadable or not of this "
                              f"model ({_first_line(e)})" + (f"; its other checkpoints: {others} (choose one by "
                                                            "step, e.g. export --step)" if others else "")) from None
    finally:
        mngr.close()


def param_shapes(cfg: LlamaConfig, heads: tuple[str, ...]):
    """ShapeDtypeStructs of a model's params (traced with the einsum attention: the kernel
    shapes nothing, and cudnn cannot even be traced off a GPU)."""
    from llama_jax.model import Llama
    from llama_jax.sharding import abstract_params

    return abstract_params(Llama(cfg.replace(attention="xla"), heads))


def check_params(path: str, step: int, meta: dict) -> str:
    """A checkpoint's params, checked without reading their arrays: the item is there, its
    tree's metadata reads, and every array has the shape of the model its meta names.
    Returns a one-line summary; a CheckpointError otherwise."""
    where = os.path.join(_checkpoint_dir(path), str(step))
    missing = [item for item in ("params", "meta") if not os.path.isdir(os.path.join(where, item))]
    if missing:
        raise CheckpointError(f"{where}: checkpoint {step} has no {' or '.join(missing)} (deleted or never written)")
    try:
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(os.path.abspath(os.path.join(where, "params"))).item_metadata
    except Exception as e:  # noqa: BLE001 - orbax raises several types
        raise CheckpointError(f"{where}/params: unreadable ({_first_line(e)})") from None
    if tree is None:
        raise CheckpointError(f"{where}/params: unreadable (its metadata is missing or damaged)")
    saved = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
        tree.tree if hasattr(tree, "tree") else tree)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
        param_shapes(model_config(meta), tuple(meta.get("heads", ["lm"]))))}
    if saved != want:
        wrong = sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k))
        raise CheckpointError(f"{where}/params: not the model its meta names ({wrong[0]}: saved "
                              f"{saved.get(wrong[0])}, the model's {want.get(wrong[0])}"
                              + (f", and {len(wrong) - 1} more" if len(wrong) > 1 else "") + ")")
    n = sum(math.prod(shape) for shape in saved.values())
    return f"params: {len(saved)} arrays, {n:,} values, shapes as the model's (array data not read: export reads it)"


def model_fields_differing(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields of `current` (a LlamaConfig dict) that a checkpoint's saved model dict
    does not match, except those in `ignore`. A field added to LlamaConfig after the
    checkpoint was written counts as its default there, so older runs still resume."""
    saved = {**LlamaConfig().to_dict(), **saved}
    diff = {k for k in current if k not in ignore and saved.get(k) != current[k]}
    ffn = {"ffn_hidden_dim", "multiple_of", "ffn_dim_multiplier"}
    if diff & ffn:  # one FFN width, said two ways (an import records the width, a preset Meta's formula)
        try:
            if LlamaConfig.from_dict(saved).hidden_dim == LlamaConfig.from_dict(current).hidden_dim:
                diff -= ffn
        except (TypeError, ValueError):
            pass
    return sorted(diff)


def model_config(meta: dict, **overrides) -> LlamaConfig:
    return LlamaConfig.from_dict({**meta["model"], **overrides})


def weights_id(params, per_leaf: int = 4096) -> str:
    """An id of a model's weights: a digest of each leaf's path, shape, dtype and
    `per_leaf` of its values, evenly strided (two models differ almost everywhere; reading
    a sample keeps it quick for any size)."""
    import hashlib

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        a = np.asarray(leaf)
        flat = a.reshape(-1)
        digest.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        digest.update(np.ascontiguousarray(flat[::max(1, flat.size // per_leaf)][:per_leaf]).tobytes())
    return "weights-" + digest.hexdigest()[:32]


def save_params(output: str, params, meta: dict, step: int = 0, tokenizer_path: str | None = None) -> None:
    """Writes a params-only checkpoint (params + meta [+ tokenizer.model]) to `output`, a
    new or empty directory: the layout of an export, which inference and `init_from`
    accept. A failed write leaves no `output` behind. Metadata without a run id (an import)
    gets one made from the weights (`weights_id`): a model imported again at the same path
    from other weights is another checkpoint to a run that began from the first (its
    reference), the same weights imported again the same one."""
    from flax.linen import meta as flax_meta

    from llama_jax.workdir import staged_directory

    params = flax_meta.unbox(params)  # `Llama(cfg).init(...)["params"]` holds boxed (LogicallyPartitioned) arrays
    with staged_directory(output, CheckpointError) as tmp:
        mngr = _manager(os.path.join(tmp, "checkpoints"), async_save=False)
        try:
            mngr.save(int(step), args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                         meta=ocp.args.JsonSave({"run": weights_id(params), **meta,
                                                                                 "step": int(step)})))
            mngr.wait_until_finished()
        finally:
            mngr.close()
        if tokenizer_path and os.path.exists(tokenizer_path):
            shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))


def load_model(path: str, step: int | None = None, shardings=None, **config_overrides):
    """(LlamaConfig, params, heads, tokenizer path or None) of a run dir or export.
    Params land on `shardings` (a pytree of Shardings), else in host memory (the CPU
    device: an export goes to files, and a large model fits no single accelerator)."""

    step, meta = read_meta(path, step)
    cfg = model_config(meta, **config_overrides)
    heads = tuple(meta.get("heads", ["lm"]))
    shapes = param_shapes(cfg, heads)
    if shardings is None:
        try:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        except RuntimeError:  # JAX_PLATFORMS without cpu
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                    shardings)
    params = load_params(path, target, step)
    tok = os.path.join(path, "tokenizer.model")
    return cfg, params, heads, (tok if os.path.exists(tok) else None)


def export_params(workdir: str, output: str, step: int | None = None) -> int:
    """Writes a params-only checkpoint (plus meta and the tokenizer) to `output`."""
    from llama_jax.workdir import require_empty

    step, meta = read_meta(workdir, step)
    require_empty(output, CheckpointError)  # before the params are read
    _, params, _, tok = load_model(workdir, step)
    save_params(output, params, meta, step, tok)
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama_jax.checkpoint")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a params-only checkpoint for inference")
    e.add_argument("--workdir", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--step", type=int, default=None)
    i = sub.add_parser("info", help="print a checkpoint's step and meta, and check its params (present, readable "
                                    "metadata, the model's shapes; the arrays are not read)")
    i.add_argument("path")
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.checkpoint")
    quiet_orbax()
    try:
        if args.cmd == "export":
            step = export_params(args.workdir, args.output, args.step)
            print(f"exported params of step {step} to {args.output}")
        else:
            step, meta = read_meta(args.path)
            print(f"step {step}: {meta}")
            print(check_params(args.path, step, meta))
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
