"""Will this run fit? Lowers and compiles the real train step of an experiment for N
simulated devices, without allocating a single weight, and prints per-device memory and
FLOPs.

    python launch/aot_compile.py --config=experiments/pretrain.py:70b --num_devices=256 \\
        [--chip=v5p] [--config.mesh.tensor=8 --config.grad_accum_steps=16 ...]

The step is the one `llama_jax.main` runs (`train.build_step`: same model, optimizer,
shardings, remat and gradient accumulation), compiled by XLA:CPU over N fake CPU devices
in one process. Argument sizes (parameters, optimizer state, batch) are exact for any
backend; temporaries are XLA:CPU's schedule, which fuses and rematerialises differently
from the TPU and GPU compilers, so read them as an estimate (typically within a small
factor; see the README). `--chip` compares the total with that chip's memory.
"""

from __future__ import annotations

import os
import sys


def _preparse_devices(argv: list[str]) -> int:
    """--num_devices must reach XLA_FLAGS before jax starts its CPU backend (the last one
    given, as absl reads it)."""
    n = "8"
    for i, a in enumerate(argv):
        if a.startswith("--num_devices="):
            n = a.split("=", 1)[1]
        elif a == "--num_devices" and i + 1 < len(argv):
            n = argv[i + 1]
    return int(n)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
    try:
        _n = _preparse_devices(sys.argv[1:])
    except ValueError:
        _n = 0
    if _n < 1:
        sys.exit("error: --num_devices must be a positive integer")
    _flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/X.py:ARG", lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "simulated devices (the mesh's -1 axis takes what is left)")
_CHIP = flags.DEFINE_string("chip", "", "compare with this chip's memory: " + ", ".join(
    ["v4", "v5e", "v5p", "v6e", "a100-40", "a100-80", "h100", "h200"]))
_JSON = flags.DEFINE_string("json", "", "also write the numbers to this JSON file")
flags.mark_flags_as_required(["config"])

GIB = 1024**3
CHIP_MEMORY_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "a100-40": 40, "a100-80": 80, "h100": 80, "h200": 141}


# What a stage holds beside the train step compiled here (the reward models, a reference
# policy, a gathered sampling copy): on the same devices, so add them to the total.
NOT_COUNTED = {
    "ppo": "the reference policy and the reward models PPO keeps on the devices beside the policy, and the "
           "whole copy of the policy gathered for sampling (config.mesh.gather_for_generation)",
    "rejection_sampling": "the reward models that score the samples, and the sampling pass (its KV cache)",
}


def analyse(config, num_devices: int) -> dict:
    """Compiles the train step of `config` for the current (simulated) devices; returns
    per-device memory (bytes) and FLOPs."""
    import jax

    from llama_jax import configs, sharding
    from llama_jax.stages import STAGES
    from llama_jax.train import build_step, check_config, check_overrides, jit_train_step, run_model

    if jax.device_count() != num_devices:
        raise SystemExit(f"error: {jax.device_count()} devices, expected {num_devices} (set before jax starts)")
    if config.stage not in STAGES:
        raise SystemExit(f"error: config.stage: unknown stage {config.stage!r}; known: {sorted(STAGES)}")
    stage = STAGES[config.stage]()
    overrides = config_flags.get_override_values(flags.FLAGS["config"]) if flags.FLAGS.is_parsed() else {}
    check_config(config, stage)  # what the run would refuse at its start is refused here, not compiled
    check_overrides(config, stage, overrides)
    if config.init_from and os.path.exists(config.init_from):  # the model the run would train: its checkpoint's
        cfg = run_model(config, stage, overrides)
        print(f"model: config.init_from {config.init_from}'s", flush=True)
    else:  # the fine-tuning presets' config.model is the architecture they name (7b, ...)
        cfg = configs.to_llama_config(config.model)
        if config.init_from:
            print(f"model: config.model (config.init_from {config.init_from} is not here)", flush=True)
    if config.seq_len > cfg.max_seq_len:
        raise SystemExit(f"error: config.seq_len {config.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    # The target is a TPU or GPU, where "auto" picks autodiff's backward passes; resolved
    # here, XLA:CPU would compile the hand-written ones it picks for a CPU
    cfg = cfg.replace(**{f: "xla" for f in ("mlp_backward", "head_backward") if getattr(cfg, f) == "auto"})
    mesh, rules = sharding.run_mesh(config.mesh)
    sharding.check_model_fits_mesh(cfg, mesh)
    shards, accum = sharding.batch_shards(mesh, rules), int(config.grad_accum_steps)
    if accum < 1 or config.batch_size % accum or (config.batch_size // accum) % shards:
        raise SystemExit(f"error: the micro-batch (config.batch_size {config.batch_size} / config.grad_accum_steps "
                         f"{accum}) must be a whole number of rows divisible by the {shards} shards of the batch "
                         "axis (config.mesh data x fsdp); otherwise every device computes all its rows")
    plan = build_step(config, cfg, stage, mesh, rules)
    note = sharding.replication_note(plan.model, mesh, rules)
    if note:
        print(f"warning: {note}", flush=True)
    frozen = frozen_sh = None
    if stage.uses_frozen:
        frozen, frozen_sh = plan.abstract_state.params, plan.param_sh
    step = jit_train_step(plan.step_fn, plan.state_sh, plan.batch_sh, mesh, rules, frozen_sh)
    start = time.perf_counter()
    with sharding.activate(mesh, rules):
        lowered = step.jitted.lower(plan.abstract_state, plan.abstract_batch, frozen)
        compiled = lowered.compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(plan.abstract_state))
    tokens = config.batch_size * config.seq_len * stage.rows_per_example
    out = {
        "stage": config.stage, "num_devices": num_devices,
        "mesh": dict(mesh.shape), "batch_size": config.batch_size, "seq_len": config.seq_len,
        "grad_accum_steps": config.grad_accum_steps, "dtype": cfg.dtype, "remat_policy": cfg.remat_policy,
        "attention": cfg.attention, "head_dim": cfg.head_dim,
        "params": cfg.num_params(stage.heads), "state_bytes_total": state_bytes,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "model_flops_per_device": stage.flops_per_token(cfg, config.seq_len) * tokens / num_devices,
        "compile_seconds": seconds,
    }
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def report(r: dict, chip: str = "") -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['params'] / 1e9:.3g}B params, stage {r['stage']}, {r['num_devices']} devices ({mesh}), "
        f"batch {r['batch_size']} x {r['seq_len']} (grad_accum_steps {r['grad_accum_steps']}), "
        f"{r['dtype']} compute, remat {r['remat_policy']}; compiled in {r['compile_seconds']:.0f} s",
        "per device:",
        f"  arguments    {r['argument_bytes'] / GIB:9.2f} GiB  (train state {r['state_bytes_total'] / GIB:.1f} GiB "
        f"over all devices, + batch)",
        f"  outputs      {r['output_bytes'] / GIB:9.2f} GiB  ({r['alias_bytes'] / GIB:.2f} GiB reuse donated "
        "arguments)",
        f"  temporaries  {r['temp_bytes'] / GIB:9.2f} GiB  (activations, gradients, XLA:CPU's schedule)",
        f"  total        {r['total_bytes'] / GIB:9.2f} GiB",
        f"  FLOPs/step   {r['model_flops_per_device']:.3e} (model: 6N + attention per token; XLA's cost analysis "
        f"says {r['xla_flops_per_device']:.3e}, counting a scanned layer stack once)",
    ]
    besides = NOT_COUNTED.get(r["stage"])
    if chip:
        cap = CHIP_MEMORY_GIB[chip]
        verdict = "fits" if r["total_bytes"] / GIB <= 0.9 * cap else "does NOT fit"
        lines.append(f"{chip}: {cap} GiB per chip -> {verdict} (keeping 10% headroom)"
                     + (", the train step alone" if besides else ""))
    # where a GPU's attention=auto runs cuDNN's kernel (model.attention_kernel's conditions)
    if chip.startswith(("a100", "h100", "h200")) and r.get("attention") == "auto" and \
            r["dtype"] in ("bfloat16", "float16") and r.get("head_dim", 0) % 8 == 0 and r.get("head_dim", 0) <= 128:
        lines.append("attention: compiled here as XLA einsums, whose [batch, heads, seq, seq] scores are among the "
                     "temporaries; on the GPU, attention=auto runs cuDNN's flash kernel, which keeps none, so the "
                     "temporaries (and the verdict) overstate what the GPU needs")
    if besides:
        lines.append(f"not counted: {besides}")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CHIP.value and _CHIP.value not in CHIP_MEMORY_GIB:
        print(f"error: --chip={_CHIP.value}: unknown; known: {sorted(CHIP_MEMORY_GIB)}", file=sys.stderr)
        sys.exit(2)
    from llama_jax.sharding import MeshError
    from llama_jax.train import RunError

    if _JSON.value and not os.path.isdir(os.path.dirname(os.path.abspath(_JSON.value))):
        print(f"error: --json={_JSON.value}: its directory does not exist", file=sys.stderr)  # before the compile
        sys.exit(2)
    try:
        config = _CONFIG.value
        config.stage  # noqa: B018 - a file that failed to load raises on first use
    except Exception as e:  # noqa: BLE001 - ml_collections raises several types
        print("error: --config: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()),
              file=sys.stderr)
        sys.exit(2)
    from llama_jax.checkpoint import quiet_orbax

    quiet_orbax()  # config.init_from's metadata is read: no Orbax log lines
    try:
        r = analyse(config, _NUM_DEVICES.value)
    except (MeshError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(report(r, _CHIP.value))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    from llama_jax import cli

    usage = "usage: python launch/aot_compile.py --config=experiments/X.py:ARG --num_devices=N [--config.a.b=v]"
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, usage))
