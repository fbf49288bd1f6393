"""Running `python -m llama_jax.main` as a user does: the small config the process tests
share, its command line and environment, and reading a run's losses."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.model.dim=48", "--config.model.n_layers=2", "--config.model.n_heads=4",
         "--config.model.n_kv_heads=2", "--config.model.vocab_size=512", "--config.seq_len=64",
         "--config.batch_size=4", "--config.log_every_steps=1", "--config.eval_every_steps=0",
         "--config.checkpoint_every_steps=3", "--config.optimizer.warmup_steps=3", "--config.sample.prompt=",
         "--config.data.eval_source=", "--config.checkpoint.max_to_keep=2"]


def load_experiment(name: str):
    """The module of experiments/NAME.py (its `get_config(arg)`), as `--config=` loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"experiment_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(workdir, *extra, steps=12, experiment="pretrain.py:tiny"):
    return [sys.executable, "-m", "llama_jax.main", f"--config={ROOT}/experiments/{experiment}",
            f"--workdir={workdir}", f"--config.total_steps={steps}", *SMALL, *extra]


_CACHE = []


def compilation_cache() -> str:
    """One JAX persistent compilation cache for every process the tests start (made on
    first use, removed at exit): most of them compile the same few programs of the small
    config, and a cache hit loads the same executable (the recipe does the same)."""
    if not _CACHE:
        _CACHE.append(tempfile.mkdtemp(prefix="llama_jax_test_jax_cache_"))
        atexit.register(shutil.rmtree, _CACHE[0], ignore_errors=True)
    return _CACHE[0]


def env(cache: bool = True):
    """A user's environment for `python -m llama_jax.main`, with the tests' shared
    compilation cache unless `cache` is False."""
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # a plain single-device run, as a user's
    e["JAX_PLATFORMS"] = "cpu"
    if not cache:  # the cache itself is in this process's environment (conftest)
        e.pop("JAX_COMPILATION_CACHE_DIR", None)
    return e


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def make_tokenizer(tmp_path_factory):
    """One 512-piece tokenizer for every run (each run would otherwise train its own)."""
    from llama_jax import tokenizer as tk
    from llama_jax.data.sources import StdlibCorpus

    d = tmp_path_factory.mktemp("tok")
    corpus = StdlibCorpus("train")
    (d / "sample.txt").write_text("\n".join(corpus[i] for i in range(0, len(corpus), 8)))
    return tk.train([str(d / "sample.txt")], 512, str(d / "tok.model")).path


def make_reference_run(tmp_path_factory, tokenizer_path):
    """12 uninterrupted steps of the small config (checkpoints at 9 and 12)."""
    workdir = str(tmp_path_factory.mktemp("ref"))
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}"), env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out
