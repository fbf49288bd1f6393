"""The main entry point as a user runs it: real processes, overrides, metrics files,
bad overrides, and resume exactness after SIGKILL (also during a checkpoint write)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.model.dim=48", "--config.model.n_layers=2", "--config.model.n_heads=4",
         "--config.model.n_kv_heads=2", "--config.model.vocab_size=512", "--config.seq_len=64",
         "--config.batch_size=4", "--config.log_every_steps=1", "--config.eval_every_steps=0",
         "--config.checkpoint_every_steps=3", "--config.optimizer.warmup_steps=3", "--config.sample.prompt=",
         "--config.data.eval_source=", "--config.checkpoint.max_to_keep=2"]


def command(workdir, *extra, steps=12):
    return [sys.executable, "-m", "llama_jax.main", f"--config={ROOT}/experiments/pretrain.py:tiny",
            f"--workdir={workdir}", f"--config.total_steps={steps}", *SMALL, *extra]


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # a plain single-device run, as a user's
    e["JAX_PLATFORMS"] = "cpu"
    return e


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """One tokenizer for every run here (each run would otherwise train its own)."""
    from llama_jax import tokenizer as tk
    from llama_jax.data.sources import StdlibCorpus

    d = tmp_path_factory.mktemp("tok")
    corpus = StdlibCorpus("train")
    (d / "sample.txt").write_text("\n".join(corpus[i] for i in range(0, len(corpus), 8)))
    return tk.train([str(d / "sample.txt")], 512, str(d / "tok.model")).path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tokenizer_path):
    workdir = str(tmp_path_factory.mktemp("ref"))
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}"), env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_run_writes_metrics_checkpoints_and_applies_overrides(reference_run):
    workdir, out = reference_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    from tensorboardX.proto import event_pb2  # the TensorBoard file really holds the scalars

    tags = set()
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            n = int.from_bytes(data[i:i + 8], "little")
            tags |= {v.tag for v in event_pb2.Event.FromString(data[i + 12:i + 12 + n]).summary.value}
            i += 12 + n + 4
    assert {"loss", "learning_rate", "mfu"} <= tags
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    assert cfg["model"]["n_layers"] == 2 and cfg["model"]["dim"] == 48
    assert "step 12/12" in out.stderr


def test_resume_after_sigkill_gives_identical_losses(tmp_path, reference_run, tokenizer_path):
    """Kill twice: once right after a checkpoint completes and once while one is being
    written; each restart with the same command continues, and every step's loss equals
    the uninterrupted run's, bitwise."""
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "run")
    cmd = command(workdir, f"--config.data.tokenizer={tokenizer_path}")
    ckpt_dir = os.path.join(workdir, "checkpoints")

    def run_until(predicate):
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if predicate():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        proc.wait()
        return False

    def finished(step):
        return os.path.isdir(os.path.join(ckpt_dir, str(step)))

    def writing():
        return os.path.isdir(ckpt_dir) and any("tmp" in d for d in os.listdir(ckpt_dir)) and finished(3)

    assert run_until(lambda: finished(3))  # killed after step 3's checkpoint
    assert run_until(writing)  # killed in the middle of a later checkpoint write
    final = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from step" in final.stderr + final.stdout
    assert losses(workdir) == losses(ref_dir)  # bitwise: floats compared exactly


@pytest.mark.parametrize("override,needle", [
    ("--config.modle.n_layers=2", "modle"),
    ("--config.model.n_layers=two", "two"),
    ("--config.model.n_heads=5", "dim=48 is not divisible by n_heads=5"),
    ("--config.mesh.tensor=3", "devices are not divisible by the fixed axes' product 3"),
    ("--config.stage=pretrian", "unknown stage 'pretrian'"),
])
def test_bad_overrides_fail_with_a_clear_message(tmp_path, override, needle):
    out = subprocess.run(command(str(tmp_path), override, steps=1), env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_init_from_starts_from_another_runs_params(tmp_path, reference_run, tokenizer_path):
    import jax
    import numpy as np

    from llama_jax import checkpoint as ckpt
    from llama_jax.model import Llama
    from llama_jax.sharding import abstract_params

    ref_dir, _ = reference_run
    out = subprocess.run(command(str(tmp_path), f"--config.data.tokenizer={tokenizer_path}",
                                 f"--config.init_from={ref_dir}", "--config.optimizer.learning_rate=0.0", steps=1),
                         env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _, meta = ckpt.read_meta(ref_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                    abstract_params(Llama(ckpt.model_config(meta))))
    before, after = ckpt.load_params(ref_dir, target), ckpt.load_params(str(tmp_path), target)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # learning rate 0: unchanged


def test_fine_tuning_stages_chain_from_a_pretrained_run(tmp_path, reference_run):
    """SFT from the pretrained run, then a reward model and DPO from the SFT run: each a
    real `python -m llama_jax.main` with its experiment config, on the toy data."""
    ref_dir, _ = reference_run
    toy = ["--config.data.synthetic_train=64", "--config.data.synthetic_eval=16", "--config.batch_size=4",
           "--config.seq_len=128", "--config.log_every_steps=2", "--config.eval_every_steps=0",
           "--config.checkpoint_every_steps=4", "--config.total_steps=4", "--config.eval_steps=2",
           "--config.optimizer.warmup_steps=1"]

    def stage(name, workdir, *extra):
        cmd = [sys.executable, "-m", "llama_jax.main", f"--config={ROOT}/experiments/{name}.py:tiny",
               f"--workdir={workdir}", *toy, *extra]
        out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return out, {k: v for r in rows for k, v in r.items()}

    sft_dir = str(tmp_path / "sft")
    _, sft = stage("sft", sft_dir, f"--config.init_from={ref_dir}", "--config.eval_exact_match=4",
                   "--config.eval_max_new_tokens=4")
    assert 0.0 <= sft["eval_exact_match"] <= 1.0 and sft["eval_loss"] > 0
    assert os.path.exists(os.path.join(sft_dir, "data", "chat_train.jsonl"))
    assert open(os.path.join(sft_dir, "tokenizer.model"), "rb").read() == open(
        os.path.join(ref_dir, "tokenizer.model"), "rb").read()  # the pretrained model's tokenizer

    out, rm = stage("reward_model", str(tmp_path / "rm"), f"--config.init_from={sft_dir}",
                    "--config.reward.margin=large")
    assert "initialised from scratch (not in init_from): ['score_head']['bias'], ['score_head']['kernel']" in (
        out.stdout + out.stderr)
    assert {"eval_significantly_better", "eval_loss", "eval_accuracy"} <= set(rm)
    from llama_jax import checkpoint as ckpt

    assert ckpt.read_meta(str(tmp_path / "rm"))[1]["heads"] == ["score"]

    _, dpo = stage("dpo", str(tmp_path / "dpo"), f"--config.init_from={sft_dir}")
    assert 0.0 <= dpo["eval_accuracy"] <= 1.0 and dpo["loss"] > 0
