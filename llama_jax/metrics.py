"""Metrics: `WORKDIR/metrics.jsonl` (one JSON object per log step), TensorBoard event
files under `WORKDIR/tensorboard`, a progress line with ETA, and MFU accounting.

MFU = training FLOPs per token x tokens/s / (devices x peak FLOP/s per device), with
FLOPs per token = 6 N_matmul + 6 L T H Dh (causal attention; LlamaConfig.
train_flops_per_token with the stage's heads, and DPO's frozen reference forward pass on
top: Stage.flops_per_token). Peaks are dense bf16 per chip; on a CPU the float32 matmul peak
is measured once (a 2048^3 jitted matmul) and split across the host's devices.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, by substrings of jax's `device_kind`, first match wins
# (a v5p reports itself as "TPU v5", a v5e as "TPU v5 lite", a v6e as "TPU v6 lite").
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("tpu v5", 459e12), ("v4", 275e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
)


def measure_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this host (all its cores)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# CPU features that decide which matmul kernels a library can use (AMX: Intel's tile
# units, which oneDNN, hence PyTorch's bfloat16 autocast, uses and XLA:CPU does not).
CPU_FLAGS = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'<model name>, <N> cores (<matmul-relevant ISA flags>)', for benchmark headers."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [label for flag, label in CPU_FLAGS if flag in flags]
    return f"{name}, {os.cpu_count()} cores" + (f" ({', '.join(isa)})" if isa else "")


def peak_flops_per_device(override: float = 0.0) -> float:
    if override and override > 0:
        return float(override)
    dev = jax.devices()[0]
    kind = dev.device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    if dev.platform == "cpu":
        return measure_cpu_peak() / jax.local_device_count()
    return 0.0  # unknown accelerator: MFU is reported as 0


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch
    when it is installed (to accept torch tensors), 2-3 s of every run's start on a CPU;
    we write only Python floats. A torch this process already imported is left alone."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows for
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends rows to metrics.jsonl and TensorBoard. On a resumed run, rows after the
    restored step are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        """resume_step -1: a fresh start, no row kept. `rows`: the rows kept and written."""
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        self.rows: list[dict] = []
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip()]
            kept = []
            for i, r in enumerate(rows):
                try:
                    row = json.loads(r)
                except json.JSONDecodeError:
                    if i == len(rows) - 1:  # the row being written when the run was killed: dropped
                        break
                    raise ValueError(f"{self.path}: row {i + 1} is not JSON; fix or remove that row") from None
                if row.get("step", 0) <= resume_step:
                    kept.append(r)
                    self.rows.append(row)
            if len(kept) != len(rows):
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
        try:
            SummaryWriter = _summary_writer()
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=max(resume_step + 1, 0))
        except ImportError:  # TensorBoard output is optional; metrics.jsonl is always written
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Progress:
    """One status line: step (or `what`), loss, throughput and ETA; redrawn in place on a
    terminal, one line per update otherwise (logs). `throttle`: for callers that update
    at every item (evaluation batches), at most one line a second on a terminal and every
    30 s in a log, and the last one always. A total not known at the start (None) may come
    with an update. `delay`: nothing is shown for work done within that many seconds."""

    def __init__(self, total_steps: int | None, start_step: int = 0, stream=None, enabled: bool = True,
                 what: str = "step", throttle: bool = False, delay: float = 0.0, scale: float = 0.0):
        # scale: counts shown divided by it, to one decimal (bytes as MB: 1e6)
        self.total, self.start, self.what, self.delay, self.scale = total_steps, start_step, what, delay, scale
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = enabled
        self.every = (1.0 if self.tty else 30.0) if throttle else 0.0
        self.last, self.drawn = -math.inf, False

    def update(self, step: int, total: int | None = None, **fields) -> None:
        if not self.enabled:
            return
        self.total = total or self.total
        now = time.perf_counter()
        if now - self.last < self.every and not (self.total and step >= self.total) or now - self.t0 < self.delay:
            return
        self.last, done = now, step - self.start
        shown = (lambda n: f"{n / self.scale:,.1f}") if self.scale else str
        parts = [f"{self.what} {shown(step)}" + (f"/{shown(self.total)}" if self.total else "")]
        parts += [f"{k} {_fmt(v)}" for k, v in fields.items()]
        if self.total:
            parts.append(f"eta {_duration((now - self.t0) / done * (self.total - step) if done > 0 else math.nan)}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = True

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Ends a line redrawn in place."""
        if self.enabled and self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
