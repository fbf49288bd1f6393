"""The main entry point as a user runs it: real processes, overrides, metrics files,
bad overrides, and resume exactness after SIGKILL (also during a checkpoint write)."""

import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from procs import ROOT, SMALL, command, env, load_experiment, losses  # noqa: F401 - reference_run, tokenizer_path: conftest


def test_run_writes_metrics_checkpoints_and_applies_overrides(reference_run):
    workdir, out = reference_run
    assert re.search(r"training data: source stdlib, documents [\d,]+, corpus stdlib-3", out.stdout), out.stdout
    assert "note: config.data.eval_source is empty: no held-out loss (eval_loss" in out.stdout  # SMALL has none
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))  # the run's median, not the last step's
    assert final["median_tokens_per_second"] == pytest.approx(np.median([r["tokens_per_second"] for r in rows[1:]]))
    assert final["tokens_per_second"] == pytest.approx(rows[-1]["tokens_per_second"])
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


def test_ten_random_kills_resume_to_identical_parameters(tmp_path, reference_run, tokenizer_path):
    """10 SIGKILLs of three kinds: a random 0-0.1 s after a checkpoint is complete (mid-step),
    a random 0-0.1 s after the restart's first or second step (before its first save is
    complete), and while a checkpoint is being written (a new Orbax temporary directory
    exists). Each waits for an event of the run, not a time, so that a loaded machine is
    killed at the same places. Every restart from a complete checkpoint resumes; the per-step losses and
    the final parameters equal the uninterrupted run's, bitwise. A fast machine may finish the
    12 steps before a kill lands (its steps take milliseconds); such a run must end cleanly
    and equal the uninterrupted one, and the trials go on from a fresh workdir."""
    import random

    ref_dir, _ = reference_run
    workdir = str(tmp_path / "run")
    cmd = command(workdir, f"--config.data.tokenizer={tokenizer_path}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    rng = random.Random(0)

    def complete():
        return {d for d in os.listdir(ckpt_dir) if "tmp" not in d} if os.path.isdir(ckpt_dir) else set()

    def writing(since_ns):  # a temporary directory made since then (an earlier kill's may have the same name)
        try:
            with os.scandir(ckpt_dir) as it:
                return any("tmp" in d.name and d.stat().st_ctime_ns >= since_ns for d in it)
        except FileNotFoundError:  # no checkpoint directory yet, or one renamed while looked at
            return False

    kills, finished, trials = 0, 0, []
    # Only a kill after a complete checkpoint moves the run on: 3 of them reach step 9 of the 12.
    schedule = ["after_checkpoint", "mid_step", "mid_write", "mid_step", "after_checkpoint", "mid_write",
                "mid_step", "mid_write", "after_checkpoint", "mid_step"]
    for kind in schedule:
        delay, nth_step = rng.uniform(0.0, 0.1), rng.randint(1, 2)
        started, before = time.time_ns(), complete()
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = {"steps": [], "resumed": False}

        def read(proc=proc, seen=seen):
            for line in proc.stdout:
                seen["resumed"] |= line.startswith("resumed from step")
                if line.startswith("step "):
                    seen["steps"].append(int(line.split()[1].split("/")[0]))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def event(kind=kind, nth_step=nth_step, seen=seen, before=before, started=started):
            if kind == "after_checkpoint":
                return bool(complete() - before)
            if kind == "mid_write":
                return writing(started)
            return len(seen["steps"]) >= nth_step

        deadline, killed = time.time() + 120, False
        while proc.poll() is None and time.time() < deadline:
            if "at" not in seen and event():
                seen["at"] = time.time() + (0.0 if kind == "mid_write" else delay)
            if time.time() >= seen.get("at", math.inf):
                proc.send_signal(signal.SIGKILL)
                kills, killed = kills + 1, True
                break
            time.sleep(0.002)
        if proc.poll() is None and not killed:  # neither its event nor its end within 2 minutes
            proc.kill()
        proc.wait()
        reader.join(timeout=10)
        trials.append((kind, seen["resumed"], seen["steps"], proc.returncode))
        assert seen["resumed"] == bool(before), f"a start resumes iff a checkpoint is complete; trials: {trials}"
        if not killed:  # it ran to the end before its kill: a clean exit, and the uninterrupted run's result
            assert proc.returncode == 0, f"a run neither killed nor finished; (kind, resumed, steps, rc): {trials}"
            assert_same_run(workdir, ref_dir)
            shutil.rmtree(workdir)
            finished += 1
    # On a loaded machine all 10 kill; on a fast one a run may reach step 12 before its kill lands.
    assert kills >= 8, f"kills {kills}, finished {finished}; (kind, resumed, steps, rc): {trials}"
    final = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(workdir, ref_dir)


def assert_same_run(workdir, ref_dir):
    """The run in `workdir` logged the reference run's per-step losses and ended on its
    parameters, bitwise."""
    assert losses(workdir) == losses(ref_dir)  # bitwise: floats compared exactly
    from llama_jax import checkpoint as ckpt
    from llama_jax.model import Llama
    from llama_jax.sharding import abstract_params

    _, meta = ckpt.read_meta(ref_dir)
    shapes = abstract_params(Llama(ckpt.model_config(meta)))
    a, b = ckpt.load_params(ref_dir, shapes), ckpt.load_params(workdir, shapes)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _rows(workdir) -> list[dict]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(tmp_path, tokenizer_path):
    """A scheduler's preemption notice (SIGTERM) mid-run: the run logs and saves the step
    it is at (between checkpoint intervals) and exits 143; the rerun resumes from it."""
    workdir = str(tmp_path)
    args = command(workdir, f"--config.data.tokenizer={tokenizer_path}", "--config.checkpoint_every_steps=1000",
                   "--config.log_every_steps=2", steps=1000)
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not any(r["step"] >= 3 for r in _rows(workdir)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=120)  # while it runs
    assert second.returncode == 1 and "another run is using this workdir" in second.stderr, second.stderr[-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 143, err[-3000:]
    step = int(re.search(r"preempted \(SIGTERM\) at step (\d+): checkpoint \1 saved", err).group(1))
    assert 4 <= step < 1000 and os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
    assert [r["step"] for r in _rows(workdir)][-1] == step  # the steps since the last log row are logged too
    more = subprocess.run(args + [f"--config.total_steps={step + 2}"], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert more.returncode == 0 and f"resumed from step {step}" in more.stdout, more.stderr[-3000:]
    tail = [r["step"] for r in _rows(workdir) if "loss" in r and r["step"] >= step]
    assert tail == [step] + [s for s in (step + 1, step + 2) if s % 2 == 0 or s == step + 2]  # logged every 2


def test_a_finished_run_given_more_steps_is_unfinished_until_they_are_done(tmp_path, reference_run,
                                                                           tokenizer_path):
    """final_metrics.json means finished (compare, the recipe): a finished run rerun with more
    steps and stopped part-way is not finished, nor reported with its old final numbers."""
    from llama_jax import compare

    ref_dir, _ = reference_run
    workdir = str(tmp_path / "more")
    shutil.copytree(ref_dir, workdir)
    assert compare.load_run(workdir)["status"] == "finished"
    proc = subprocess.Popen(command(workdir, f"--config.data.tokenizer={tokenizer_path}", steps=1000), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not any(r["step"] > 12 for r in _rows(workdir)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=200)
    assert proc.returncode == 143, err[-3000:]
    assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
    assert compare.load_run(workdir)["status"] == "unfinished"


def test_a_run_killed_in_its_final_evaluation_ends_as_an_uninterrupted_one(tmp_path, tokenizer_path):
    """Killed after its last checkpoint, before the final evaluation's row and
    final_metrics.json were written: the rerun writes both, with the logged training
    numbers. A fresh start keeps no row of a run killed before its first checkpoint."""
    workdir = str(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 99.0}\n{"step": 1, "loss": 99.0}\n')
    args = command(workdir, f"--config.data.tokenizer={tokenizer_path}", "--config.data.eval_source=stdlib:eval",
                   "--config.eval_steps=1", steps=4)
    first = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and 99.0 not in [r.get("loss") for r in rows]
    final = json.load(open(tmp_path / "final_metrics.json"))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # the eval row lost
    os.remove(tmp_path / "final_metrics.json")
    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from step 4" in again.stdout, again.stderr[-3000:]
    assert _rows(workdir) == rows
    rebuilt = json.load(open(tmp_path / "final_metrics.json"))
    assert rebuilt.pop("median_mfu") > 0 and final.pop("median_mfu") > 0  # each run measures the CPU's peak
    peak = final.pop("peak_flops_per_device")
    assert rebuilt.pop("peak_flops_per_device") > 0 and peak > 0
    assert f"mfu: against this CPU's float32 matmul peak, measured now: {peak / 1e9:.1f} GFLOP/s" in first.stdout
    # the unigram baseline is kept beside the held-out loss it is the yardstick of
    assert f"unigram baseline on the held-out batches: {final['eval_unigram_baseline']:.4f}" in first.stderr
    assert rebuilt == pytest.approx(final)
    # one batch of a held-out split of many: said once, not silently a sample of its first file
    assert first.stdout.count("note: an evaluation reads the first 1 batches of the held-out data, in file order, "
                              "not all of it") == 1


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


def test_early_stopping_returns_to_the_best_evaluation(tmp_path, tokenizer_path):
    """Early stopping on a metric that only gets worse (eval_loss with mode max): the
    step-0 weights stay the best, training stops after `patience` evaluations, and the
    run ends on the step-0 weights, saved as its last step; a rerun trains no more."""
    args = command(str(tmp_path), f"--config.data.tokenizer={tokenizer_path}", "--config.data.eval_source=stdlib:eval",
                   "--config.eval_steps=1", "--config.eval_every_steps=3", "--config.early_stopping.metric=eval_loss",
                   "--config.early_stopping.mode=max", "--config.early_stopping.patience=2",
                   "--config.checkpoint.max_to_keep=4", "--config.optimizer.learning_rate=1e-2")
    out = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "early stopping at step 6: eval_loss has not improved on" in out.stderr
    assert "early stopping keeps step 0" in out.stderr
    assert out.stdout.count("note: an evaluation reads the first 1 batches") == 1  # four evaluations, said once
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 3, 6, 12] and max(r["step"] for r in rows if "loss" in r) == 6
    assert evals[3] < evals[0] and evals[6] < evals[0]  # training did lower the loss ...
    assert evals[12] == pytest.approx(evals[0], abs=1e-5)  # ... but the run ends on the step-0 weights
    final = json.load(open(tmp_path / "final_metrics.json"))
    assert final["early_stopping_best_step"] == 0 and final["eval_loss"] == pytest.approx(evals[0], abs=1e-5)
    from llama_jax import checkpoint as ckpt

    step, meta = ckpt.read_meta(str(tmp_path))
    assert step == 12 and meta["early_stopping"]["best_step"] == 0
    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from step 12" in again.stdout
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == len(rows)  # nothing trained or added
    assert "(of a finished run: printed, not recorded; its record keeps the evaluation it ran)" in again.stderr
    assert json.load(open(tmp_path / "final_metrics.json")) == final  # nor are the finished run's numbers lost
    # killed after deciding to stop, before the best weights were saved as step 12: the
    # rerun trains no further and still ends on the step-0 weights
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    killed = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == 0 and "resumed from step 6" in killed.stdout, killed.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert max(r["step"] for r in rows if "loss" in r) == 6
    assert [r["eval_loss"] for r in rows if r["step"] == 12] == [pytest.approx(evals[0], abs=1e-5)]
    # killed before the first periodic checkpoint: the rerun resumes from the step-0 save and ends as before
    for d in os.listdir(tmp_path / "checkpoints"):
        if d != "0":
            shutil.rmtree(tmp_path / "checkpoints" / d)
    (tmp_path / "metrics.jsonl").write_text(open(tmp_path / "metrics.jsonl").read() + '{"step": 7, "lo')  # cut row
    from_zero = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert from_zero.returncode == 0 and "resumed from step 0" in from_zero.stdout, from_zero.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 6, 12]
    assert [r["eval_loss"] for r in rows if r["step"] == 12] == [pytest.approx(evals[0], abs=1e-5)]
    # a best checkpoint that later saves could delete is refused before anything runs
    bad = subprocess.run(args[:-2] + ["--config.checkpoint.max_to_keep=2"], env=env(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "config.checkpoint.max_to_keep 2 could delete the best checkpoint" in bad.stderr
    # evaluations every 4 steps, saves every 3: 8 steps of patience can hold 3 saves (6, 9, 12 after a best at 4)
    bad = subprocess.run(args[:-2] + ["--config.eval_every_steps=4", "--config.checkpoint.max_to_keep=3"], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "3 saves may follow it" in bad.stderr and "set it to 4 or more" in bad.stderr


def test_early_stopping_logs_its_last_steps_and_a_finished_run_trains_on(tmp_path, tokenizer_path):
    """Stopping between two log steps still writes the row of the steps since the last one
    (it was lost, and final_metrics had no loss); a run that ran all its steps has not
    decided to stop, so a rerun with more steps trains on when it kept its last step, and
    is refused, with the way on, when it returned to an earlier one (whose optimizer state
    it holds); the last step's evaluation is logged once when its weights are kept; and a
    resume that changes the early-stopping metric is refused (it compared the new metric
    with the old one's best)."""
    base = command(str(tmp_path / "a"), f"--config.data.tokenizer={tokenizer_path}",
                   "--config.data.eval_source=stdlib:eval", "--config.eval_steps=1",
                   "--config.early_stopping.metric=eval_loss", "--config.checkpoint.max_to_keep=6",
                   "--config.optimizer.learning_rate=1e-2")
    out = subprocess.run(base + ["--config.eval_every_steps=2", "--config.log_every_steps=4",
                                 "--config.early_stopping.mode=max", "--config.early_stopping.patience=1"],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "early stopping at step 2" in out.stderr, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [2]
    assert "loss" in json.load(open(tmp_path / "a" / "final_metrics.json"))
    def in_dir(name, *extra):
        return [a.replace(str(tmp_path / "a"), str(tmp_path / name)) for a in base] + [
            "--config.eval_every_steps=3", "--config.early_stopping.patience=3", *extra]

    first = subprocess.run(in_dir("b", "--config.early_stopping.mode=min", "--config.total_steps=6"), env=env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert len([r for r in rows if r["step"] == 6 and "eval_loss" in r]) == 1  # one row: the kept weights'
    assert all(len(r) > 1 for r in rows)  # (and no empty one beside it)
    # worse at every evaluation, but not for `patience` of them: all 6 steps run, the step-0 weights kept
    worse = in_dir("c", "--config.early_stopping.mode=max")
    ran = subprocess.run([*worse, "--config.total_steps=6"], env=env(), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "early stopping keeps step 0" in ran.stderr, ran.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r.get("early_stopping_kept_step") for r in rows if r["step"] == 6 and "eval_loss" in r] == [None, 0]
    assert json.load(open(tmp_path / "c" / "final_metrics.json"))["early_stopping_reason"] == "ran all 6 steps"
    # its last checkpoint holds step 0's weights and optimizer: training on from it would rerun step 0's schedule
    # (it trained nothing, or from warm-up again while logging another learning rate); refused, with the way on
    more = subprocess.run([*worse, "--config.total_steps=9"], env=env(), capture_output=True, text=True, timeout=300)
    assert more.returncode != 0 and ("checkpoint 6 holds step 0's weights and optimizer state, which early stopping "
                                     "returned to") in more.stderr and f"--config.init_from={tmp_path / 'c'}" in \
        more.stderr, more.stderr[-3000:]
    improved = subprocess.run([*in_dir("b", "--config.early_stopping.mode=min"), "--config.total_steps=9"],
                              env=env(), capture_output=True, text=True, timeout=300)  # kept its last step: on
    assert improved.returncode == 0 and "resumed from step 6" in improved.stdout, improved.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert max(r["step"] for r in rows if "loss" in r) == 9
    other = subprocess.run([*worse, "--config.total_steps=12", "--config.early_stopping.metric=eval_perplexity"],
                           env=env(), capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and ("config.early_stopping.metric: this run's early stopping kept metric "
                                      "'eval_loss'") in other.stderr, other.stderr[-3000:]


def test_fine_tuning_stages_chain_from_a_pretrained_run(tmp_path, reference_run, request):
    """SFT from the pretrained run, a reward model from the SFT run, then DPO, rejection
    sampling (2 processes; and with the code check as the reward), PPO, GAtt and safety
    distillation from those two, side by side: each a real `python -m llama_jax.main`
    with its experiment config, on the toy data. Then the recipe driver's report."""
    ref_dir, _ = reference_run
    toy = ["--config.data.synthetic_train=64", "--config.data.synthetic_eval=16", "--config.batch_size=4",
           "--config.seq_len=128", "--config.log_every_steps=2", "--config.eval_every_steps=0",
           "--config.checkpoint_every_steps=4", "--config.total_steps=4", "--config.eval_steps=2",
           "--config.optimizer.warmup_steps=1"]

    def start(name, workdir, *extra, devices=1, processes=1):
        """Starts a stage's run (its output to files beside the workdir); finish() waits for it."""
        cmd = [sys.executable, "-m", "llama_jax.main", f"--config={ROOT}/experiments/{name}.py:tiny",
               f"--workdir={workdir}", *toy, *extra]
        if processes > 1:  # one job of several processes on localhost (jax.distributed), `devices` each
            cmd[1:1] = [f"{ROOT}/launch/local.py", f"--num_processes={processes}", f"--devices_per_process={devices}",
                        "--timeout=400", "--"]
        e = env() if devices == 1 else {**env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        files = (open(workdir + ".out", "w+"), open(workdir + ".err", "w+"))
        proc = subprocess.Popen(cmd, env=e, stdout=files[0], stderr=files[1], text=True)
        request.addfinalizer(lambda: proc.poll() is None and proc.terminate())  # a failed test leaves none running
        return workdir, cmd, files, proc

    def finish(started):
        workdir, cmd, files, proc = started
        code = proc.wait(timeout=420)
        texts = []
        for f in files:
            f.seek(0)
            texts.append(f.read())
            f.close()
        out = subprocess.CompletedProcess(cmd, code, *texts)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return out, {k: v for r in rows for k, v in r.items()}

    def stage(*args, **kwargs):
        return finish(start(*args, **kwargs))

    sft_dir = str(tmp_path / "sft")
    out, sft = stage("sft", sft_dir, f"--config.init_from={ref_dir}", "--config.eval_exact_match=4",
                     "--config.eval_max_new_tokens=4")
    assert 0.0 <= sft["eval_exact_match"] <= 1.0 and sft["eval_loss"] > 0
    assert re.search(r"epochs: total_steps 4 x batch_size 4 rows = about [\d.]+ passes over the training data "
                     r"\(about [\d,]+ rows each, its dialogs packed into rows of seq_len 128\)", out.stdout), out.stdout
    assert os.path.exists(os.path.join(sft_dir, "data", "chat_train.jsonl"))
    # the toy data it wrote is of its settings: a rerun that would make other data is refused, not fed the old
    again = subprocess.run([sys.executable, "-m", "llama_jax.main",
                            f"--config={ROOT}/experiments/sft.py:tiny", f"--workdir={sft_dir}", *toy,
                            f"--config.init_from={ref_dir}", "--config.eval_exact_match=4",
                            "--config.eval_max_new_tokens=4", "--config.data.synthetic_train=65"], env=env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "holds data made with other settings (data.synthetic_train 64 -> 65), which" \
        in again.stderr, again.stderr[-2000:]
    assert open(os.path.join(sft_dir, "tokenizer.model"), "rb").read() == open(
        os.path.join(ref_dir, "tokenizer.model"), "rb").read()  # the pretrained model's tokenizer

    out, rm = stage("reward_model", str(tmp_path / "rm"), f"--config.init_from={sft_dir}",
                    "--config.reward.margin=large", "--config.reward.policy_prompts=12",
                    "--config.reward.policy_max_new_tokens=4")
    assert "initialised from scratch (not in init_from): ['score_head']['bias'], ['score_head']['kernel']" in (
        out.stdout + out.stderr)
    assert {"eval_significantly_better", "eval_loss", "eval_accuracy", "eval_policy_accuracy",
            "eval_accuracy_all_pairs", "eval_rejected_reward"} <= set(rm)
    pairs = int(re.search(r"training data: source .*?, pairs ([\d,]+), dropped", out.stdout).group(1).replace(",", ""))
    assert f"epochs: total_steps 4 x batch_size 4 rows = {16 / pairs:,.3g} passes" in out.stdout
    policy_eval = [json.loads(line) for line in open(tmp_path / "rm" / "data" / "preference_policy_eval.jsonl")]
    assert {f"eval_policy_accuracy_{p['task']}" for p in policy_eval} <= set(rm)  # per toy task
    policy_pairs = [json.loads(line) for line in open(tmp_path / "rm" / "data" / "preference_policy_train.jsonl")]
    assert policy_pairs and all(p["chosen"] != p["rejected"] for p in policy_pairs)  # the SFT model's answers
    assert "code-labelled pairs from 12 prompts x 4 answers" in out.stdout
    from llama_jax import checkpoint as ckpt

    assert ckpt.read_meta(str(tmp_path / "rm"))[1]["heads"] == ["score"]
    # The stages below each start from the SFT run (and the RM): they run side by side.
    rs_dir, gold_dir, ppo_dir = str(tmp_path / "rejection_sampling"), str(tmp_path / "rs_code"), str(tmp_path / "ppo")
    gatt_dir, distill_dir = str(tmp_path / "gatt"), str(tmp_path / "safety_distill")
    dpo_run = start("dpo", str(tmp_path / "dpo"), f"--config.init_from={sft_dir}")
    rs_run = start("rejection_sampling", rs_dir, f"--config.init_from={sft_dir}",
                   f"--config.rlhf.reward_model={tmp_path / 'rm'}", "--config.rlhf.safety_reward_model=",
                   "--config.rlhf.num_prompts=12", "--config.rlhf.num_samples=3", "--config.rlhf.max_new_tokens=6",
                   "--config.eval_exact_match=0", "--config.rlhf.num_eval_prompts=6", "--config.rlhf.min_reward=0",
                   "--config.mesh.gather_for_generation=true", "--config.rlhf.require_eos=false", processes=2)
    gold_run = start("rejection_sampling", gold_dir, f"--config.init_from={sft_dir}", "--config.rlhf.reward_model=code",
                     "--config.rlhf.num_prompts=12", "--config.rlhf.num_samples=3", "--config.rlhf.max_new_tokens=6",
                     "--config.eval_exact_match=0", "--config.rlhf.num_eval_prompts=6", "--config.rlhf.min_reward=0",
                     "--config.total_steps=2", "--config.rlhf.selection_beta=0", "--config.rlhf.require_eos=false")
    ppo_run = start("ppo", ppo_dir, f"--config.init_from={sft_dir}", f"--config.rlhf.reward_model={tmp_path / 'rm'}",
                    "--config.rlhf.safety_reward_model=", "--config.rlhf.num_prompts=16",
                    "--config.rlhf.num_eval_prompts=4", "--config.rlhf.max_new_tokens=6",
                    "--config.ppo.rollout_batch=8", "--config.ppo.samples_per_prompt=2",
                    "--config.eval_every_steps=2", "--config.total_steps=6",
                    "--config.rlhf.num_val_prompts=4", "--config.early_stopping.metric=",
                    "--config.ppo.value_warmup_iterations=2", "--config.optimizer.learning_rate=1e-2",
                    "--config.mesh.gather_for_generation=true", "--config.mesh.tensor=2", devices=8)
    gatt_run = start("gatt", gatt_dir, f"--config.init_from={sft_dir}", "--config.gatt.num_dialogs=12",
                     "--config.gatt.keep_only_adherent=false", "--config.gatt.num_eval_dialogs=3",
                     "--config.gatt.eval_turns=2,4", "--config.eval_max_new_tokens=4",
                     "--config.gatt.samples_per_turn=2", "--config.gatt.plain_anchors=5",
                     "--config.gatt.num_plain_eval=6", "--config.rlhf.require_eos=false")
    distill_run = start("safety_distill", distill_dir, f"--config.init_from={sft_dir}",
                        f"--config.rlhf.safety_reward_model={tmp_path / 'rm'}", "--config.rlhf.reward_model=",
                        "--config.distill.num_prompts=8",
                        "--config.distill.benign_anchors=4", "--config.distill.num_eval_prompts=4",
                        "--config.eval_max_new_tokens=4", "--config.distill.preprompt_position=prefix,system",
                        "--config.rlhf.require_eos=false")  # the barely trained model's answers seldom end in time
    # Going on from a reward model with another pooling than its score head learnt is refused.
    from llama_jax.main import run as main_run
    from llama_jax.train import RunError

    more = load_experiment("reward_model").get_config("tiny")
    more.init_from, more.model.score_pooling = str(tmp_path / "rm"), "mean"
    with pytest.raises(RunError, match=r"trained with score_pooling='last'; set --config.model.score_pooling=last"):
        main_run(more, str(tmp_path / "rm_more"))

    _, dpo = finish(dpo_run)
    assert 0.0 <= dpo["eval_accuracy"] <= 1.0 and dpo["loss"] > 0

    # Rejection sampling as 2 processes: they sample from the policy and score with the RM
    # together, each model split over the run's 2-device mesh; the lead alone writes and reports.
    out, rs = finish(rs_run)
    assert "rejection sampling: 12 prompts x 3 samples" in out.stdout
    assert "loaded whole on each of the fsdp=2 groups (mesh.gather_for_generation)" in out.stdout
    assert "[p1] rejection sampling" not in out.stdout + out.stderr and "[p1] sampled" not in out.stdout
    report = json.load(open(os.path.join(rs_dir, "rejection_sampling.json")))
    changes = {k for k in report["after"] if "_change_in_" in k}
    assert set(report["before"]) == set(report["after"]) - changes
    for p in ("eval_", "eval_sampled_"):  # the paired change is the difference of the two accuracies
        assert report["after"][f"{p}change_in_true_accuracy"] == pytest.approx(
            report["after"][f"{p}true_accuracy"] - report["before"][f"{p}true_accuracy"])
        assert report["after"][f"{p}change_in_true_accuracy_se"] >= 0.0
        assert report["after"][f"{p}change_in_reward"] == pytest.approx(  # and of the two mean rewards
            report["after"][f"{p}reward"] - report["before"][f"{p}reward"], abs=1e-6)
    assert {"eval_reward", "eval_true_accuracy"} <= set(report["after"])
    per_task = {k: v for k, v in report["after"].items() if k.startswith("eval_true_accuracy_")}
    tasks = ("add", "copy", "reverse", "sort", "safety")
    assert per_task and set(per_task) <= {f"eval_true_accuracy_{t}" for t in tasks}
    assert min(per_task.values()) <= report["after"]["eval_true_accuracy"] <= max(per_task.values())
    assert rs["eval_reward"] == report["after"]["eval_reward"]
    assert report["prompts"] == 12 and set(report["reward_vs_n"]) == {"1", "2", "3"}
    curve = report["reward_vs_n"]
    assert curve["1"]["max"] <= curve["2"]["max"] <= curve["3"]["max"]  # the best of more samples is no worse
    # the tiny config keeps the best of logit(R) + 2 log pi (RBoN), whose reward is at most the max
    assert report["selection_beta"] == 2.0 and report["mean_reward_best_sample"] <= curve["3"]["max"] + 1e-9
    assert {"eval_sampled_reward", "eval_sampled_true_accuracy"} <= set(report["after"])  # rlhf.eval_samples 2
    assert set(report["accuracy_vs_n"]) == {"1", "2", "3"}  # the same picks, checked by code
    assert report["accuracy_vs_n"]["1"] == report["accuracy_first_sample"]
    assert report["accuracy_vs_n"]["3"] == report["accuracy_best_sample"]
    best = [json.loads(line) for line in open(os.path.join(rs_dir, "data", "rs_train.jsonl"))]
    assert len(best) == 12 == report["kept_at_min_reward"]  # rlhf.min_reward 0: every prompt's best
    assert all(r["messages"][-1]["role"] == "assistant" for r in best)
    assert rs["loss"] > 0  # and the policy was fine-tuned on them

    # the toy check as a gold reward: best of K is right whenever any sample is
    out, _ = finish(gold_run)
    assert "reward: the toy prompts' code check" in out.stdout
    gold = json.load(open(os.path.join(gold_dir, "rejection_sampling.json")))
    assert gold["accuracy_best_sample"] == gold["accuracy_any_sample"] == gold["accuracy_vs_n"]["3"]
    assert gold["accuracy_kept"] == pytest.approx(gold["accuracy_any_sample"])  # min_reward 0: every prompt's best
    assert {r["reward"] for r in map(json.loads, open(os.path.join(gold_dir, "data", "rs_train.jsonl")))} <= {0.0, 1.0}
    assert gold["after"]["eval_reward"] >= gold["after"]["eval_true_accuracy"]  # = on toy prompts; refusals count too

    out, ppo = finish(ppo_run)
    assert "rollouts sample from a copy of the policy gathered over fsdp=4" in out.stdout  # on a 1x4x2 mesh
    rows = [json.loads(line) for line in open(os.path.join(ppo_dir, "metrics.jsonl"))]
    trained = [r for r in rows if "loss" in r]
    # 2 mini-batches of 4 per rollout of 8 (2 answers to each of 4 prompts): 6 steps
    assert [r["ppo_iteration"] for r in trained] == [1, 2, 3]
    assert all(0.0 <= r["rollout_reward"] <= 1.0 and r["rollout_kl"] > -1e-3 for r in trained)
    assert all(r["rollout_varied_prompts"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in trained)  # of 4 prompts
    assert all(r["rollout_unfinished"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0) for r in trained)
    assert all(r["batch_seconds"] > 0 for r in trained)  # each row's rollout, left out of tokens_per_second
    # The first rollout is the reference policy, and so is the second: the first two
    # iterations train the value head only (at LR 1e-2 the policy would have moved).
    assert [r["learning_rate"] for r in trained] == [0.0, 0.0, pytest.approx(1e-2)]
    assert trained[0]["rollout_kl"] == pytest.approx(0.0, abs=1e-4)
    assert trained[1]["rollout_kl"] == pytest.approx(0.0, abs=1e-4)
    # after the third iteration's policy steps, log pi - log pi_0 of the greedy answers is no longer 0 (either
    # sign: the greedy answers are not drawn from the policy, so this estimate of the KL can be negative)
    assert abs(ppo["eval_kl"]) > 1e-3
    assert {"eval_reward", "eval_kl", "eval_true_accuracy"} <= set(ppo)
    ppo_report = json.load(open(os.path.join(ppo_dir, "ppo.json")))
    assert ppo_report["before"]["eval_kl"] == pytest.approx(0.0, abs=1e-4)  # measured before any update
    assert ppo_report["before"]["eval_sampled_kl"] == pytest.approx(0.0, abs=1e-4)  # answers sampled too
    assert 0.0 <= ppo_report["after"]["eval_sampled_true_accuracy"] <= 1.0
    # validation prompts are answered at every evaluation, the held-out ones only before and after
    evals = {r["step"]: r for r in rows if "val_reward" in r}
    assert sorted(evals) == [0, 2, 4, 6] and not any("eval_reward" in evals[s] for s in (2, 4))
    assert "eval_reward" in evals[0] and "eval_reward" in evals[6] and "val_sampled_true_accuracy" in evals[4]
    assert {"val_reward", "eval_reward"} <= set(ppo_report["before"])
    assert ppo_report["after"]["eval_sampled_change_in_true_accuracy"] == pytest.approx(
        ppo_report["after"]["eval_sampled_true_accuracy"] - ppo_report["before"]["eval_sampled_true_accuracy"])
    assert ppo_report["after"]["eval_change_in_reward"] == pytest.approx(
        ppo_report["after"]["eval_reward"] - ppo_report["before"]["eval_reward"], abs=1e-6)
    assert ppo_report["after"]["eval_change_in_reward_se"] > 0.0  # the answers moved (|eval_kl| > 1e-3)
    val = [json.loads(line)["messages"] for line in open(os.path.join(ppo_dir, "data", "prompts_val_eval.jsonl"))]
    held = [json.loads(line)["messages"] for line in open(os.path.join(ppo_dir, "data", "prompts_eval.jsonl"))]
    assert val and val != held[:len(val)]  # another draw than the held-out prompts
    assert ckpt.read_meta(ppo_dir)[1]["heads"] == ["lm", "value"]

    out, gatt = finish(gatt_run)
    first, resampled = (int(x) for x in re.search(r"gatt: (\d+) of \d+ turns adherent at the first sample, (\d+) after",
                                                  out.stdout).groups())
    assert first <= resampled  # a retry only ever replaces a breaking answer with an adherent one
    report = report_gatt = json.load(open(os.path.join(gatt_dir, "gatt.json")))
    assert report["dialogs_kept"] == 12 and set(report["baseline"]) == set(report["after"]) == {"2", "4"}
    dialogs = [json.loads(line) for line in open(os.path.join(gatt_dir, "data", "gatt_train.jsonl"))]
    # the instruction in the first turn only; and the plain anchors: a task asked with none, the model's own answer
    assert sum(d["messages"][0]["role"] == "system" for d in dialogs) == 12 and report["plain_anchors"] == 5
    anchors = [d["messages"] for d in dialogs if d["messages"][0]["role"] == "user"]
    assert len(anchors) == 5 and all(len(m) == 2 and m[1]["role"] == "assistant" for m in anchors)
    assert 0.0 <= gatt["eval_adherence_turn_2"] <= 1.0
    assert gatt["eval_plain_accuracy"] == report["after_plain_accuracy"]
    assert 0.0 <= report["baseline_plain_accuracy"] <= 1.0

    _, distill = finish(distill_run)
    report = json.load(open(os.path.join(distill_dir, "safety_distill.json")))
    assert report["adversarial_prompts"] == 8 and 0 <= report["kept"] <= 8 and report["benign_anchors"] == 4
    trained = [json.loads(line) for line in open(os.path.join(distill_dir, "data", "distill_train.jsonl"))]
    kept = [r for r in trained if r["is_safety"]]
    assert report["min_safety"] == 0.5 and len(kept) == report["kept"]  # the tiny preset's
    assert all(r["safety_reward"] >= 0.5 for r in kept)  # only answers the safety RM calls safe are distilled
    assert set(report["kept_by_position"]) == {"prefix", "system"}  # each kept answer came from one of the two
    assert sum(report["kept_by_position"].values()) == report["kept"]
    rates = {"violation_rate", "violation_rate_rm", "false_refusal_rate"}
    assert rates <= set(report["before"]) == set(report["after"])
    assert 0.0 <= distill["eval_violation_rate"] <= 1.0

    # the recipe driver finds every stage done (pretraining and the safety RM stood in for
    # by copies) and writes its before/after report from these runs' files
    from llama_jax import recipe
    from llama_jax.data import synthetic

    shutil.copytree(ref_dir, tmp_path / "pretrain")
    shutil.copytree(tmp_path / "rm", tmp_path / "rm_safety")
    assert recipe.main([f"--workdir={tmp_path}", f"--experiments={ROOT}/experiments"]) == 0
    toy_text = open(tmp_path / "tokenizer_text.txt").read()  # what the recipe's tokenizer also learns from
    assert "Sort the words alphabetically:" in toy_text and synthetic.REFUSAL in toy_text
    rows = {(r["stage"], r["metric"]): r for r in json.load(open(tmp_path / "report.json"))["stages"]}
    rs_row = rows[("rejection_sampling", "mean reward: first sample -> picked sample")]
    rs_report = report_rs = json.load(open(os.path.join(rs_dir, "rejection_sampling.json")))
    assert (rs_row["before"], rs_row["after"]) == (rs_report["mean_reward_first_sample"],
                                                   rs_report["mean_reward_best_sample"])
    assert rows[("gatt", "instruction adherence at turn 4")]["after"] == gatt["eval_adherence_turn_4"]
    plain = rows[("gatt", "true accuracy on held-out toy tasks asked without an instruction")]
    assert (plain["before"], plain["after"]) == (report_gatt["baseline_plain_accuracy"], gatt["eval_plain_accuracy"])
    assert rows[("rejection_sampling", "held-out true accuracy of the policy (before: SFT)")]["before"] == report_rs[
        "before"]["eval_true_accuracy"]
    ppo_report = json.load(open(os.path.join(ppo_dir, "ppo.json")))
    assert rows[("ppo", "held-out reward (greedy)")]["after"] == ppo_report["after"]["eval_reward"]
    assert rows[("pretrain", "held-out loss (nats/token; before: uniform ln V)")]["before"] == pytest.approx(
        math.log(512))
    assert "| safety_distill | violation rate on held-out adversarial prompts |" in open(tmp_path / "report.md").read()



class _Done:
    """A stage's process that has already exited with `returncode`."""

    def __init__(self, returncode=0):
        self.returncode = returncode

    def poll(self):
        return self.returncode


def _finished_stage(cmd, returncode=0):
    """What the recipe's launch returns in these tests: the stage's directory with its
    final_metrics.json (when it succeeds), and a process that has exited."""
    stage_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    os.makedirs(stage_dir, exist_ok=True)
    if returncode == 0:
        open(os.path.join(stage_dir, "final_metrics.json"), "w").write("{}")
    return _Done(returncode)


def test_the_recipe_runs_each_stage_with_a_shared_compilation_cache(tmp_path, monkeypatch, capsys):
    from llama_jax import recipe

    calls = []

    def fake_launch(cmd, env, label):
        calls.append((cmd, env))
        return _finished_stage(cmd)

    monkeypatch.setattr(recipe, "write_tokenizer_text", lambda path: open(path, "w").write("toy\n"))
    monkeypatch.setattr(recipe, "launch", fake_launch)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert recipe.main([f"--workdir={tmp_path / 'a'}", f"--experiments={ROOT}/experiments"]) == 0
    assert [cmd[cmd.index("-m") + 1] for cmd, _ in calls] == ["llama_jax.main"] * len(recipe.STAGES)
    assert {env["JAX_COMPILATION_CACHE_DIR"] for _, env in calls} == {str(tmp_path / "a" / "jax_cache")}
    calls.clear()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # the user's own cache is kept
    assert recipe.main([f"--workdir={tmp_path / 'b'}", f"--experiments={ROOT}/experiments"]) == 0
    assert {env["JAX_COMPILATION_CACHE_DIR"] for _, env in calls} == {str(tmp_path / "mine")}
    # stage times: a stage rerun from scratch (its directory removed) counts from zero, a
    # resumed one (directory there, not finished) adds to its earlier time
    timings = tmp_path / "b" / "timings.json"
    json.dump({**json.load(open(timings)), "ppo": 1000.0, "gatt": 1000.0}, open(timings, "w"))
    shutil.rmtree(tmp_path / "b" / "ppo")
    os.remove(tmp_path / "b" / "gatt" / "final_metrics.json")
    # safety distillation finished from GAtt's output, which will run again: refused, with what to remove
    assert recipe.main([f"--workdir={tmp_path / 'b'}", f"--experiments={ROOT}/experiments"]) == 2
    assert (f"stages safety_distill finished from the output of gatt, ppo, which will run again; remove their "
            f"directories too to rerun them on its new output (rm -r {tmp_path / 'b' / 'safety_distill'})"
            in capsys.readouterr().err)
    os.remove(tmp_path / "b" / "safety_distill" / "final_metrics.json")
    assert recipe.main([f"--workdir={tmp_path / 'b'}", f"--experiments={ROOT}/experiments"]) == 0
    seconds = json.load(open(timings))
    assert seconds["ppo"] < 1000.0 <= seconds["gatt"]


def test_the_recipe_runs_independent_stages_side_by_side(tmp_path, monkeypatch, capsys):
    """Stages whose inputs are all finished start together, up to --jobs: the two reward
    models, then rejection sampling and PPO; an override that makes PPO read rejection
    sampling's output orders them; a failed stage lets the one beside it finish, starts no
    other, and the rerun resumes from there."""
    from llama_jax import recipe

    order, alive, beside, labels, fail = [], set(), {}, {}, {"name": None}

    class Proc:  # exits when first polled
        def __init__(self, name, code):
            self.name, self.code, self.returncode = name, code, None

        def poll(self):
            alive.discard(self.name)
            self.returncode = self.code
            return self.code

    def fake_launch(cmd, env, label):
        name = os.path.basename(next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir=")))
        order.append(name)
        beside[name], labels[name] = set(alive), label
        alive.add(name)
        code = 3 if name == fail["name"] else 0
        _finished_stage(cmd, code)
        return Proc(name, code)

    monkeypatch.setattr(recipe, "write_tokenizer_text", lambda path: open(path, "w").write("toy\n"))
    monkeypatch.setattr(recipe, "launch", fake_launch)
    base = [f"--experiments={ROOT}/experiments"]
    assert recipe.main([f"--workdir={tmp_path / 'a'}", *base]) == 0
    assert beside == {"pretrain": set(), "sft": set(), "rm": set(), "rm_safety": {"rm"}, "rejection_sampling": set(),
                      "ppo": {"rejection_sampling"}, "gatt": set(), "safety_distill": set()}
    assert labels["sft"] is None and labels["rm"] == "[rm]" and labels["ppo"] == "[ppo]"  # prefixed when side by side
    report = json.load(open(tmp_path / "a" / "report.json"))
    wall = json.load(open(tmp_path / "a" / "timings.json"))["_wall"]  # the recipe's own clock, beside the stages'
    assert report["jobs"] == 2 and report["total_minutes"] == pytest.approx(wall / 60)
    assert "stage_minutes_summed" in report
    # one at a time
    order.clear(), beside.clear()
    assert recipe.main([f"--workdir={tmp_path / 'b'}", *base, "--jobs=1"]) == 0
    assert order == [name for name, *_ in recipe.STAGES] and not any(beside.values())
    # the paper's order: PPO on the rejection-sampled policy waits for it
    order.clear(), beside.clear()
    assert recipe.main([f"--workdir={tmp_path / 'c'}", *base, "--override=ppo:init_from={w}/rejection_sampling"]) == 0
    assert order.index("ppo") > order.index("rejection_sampling") and beside["ppo"] == set()
    # an override that makes two stages wait on each other is an error, not a hang
    capsys.readouterr()
    assert recipe.main([f"--workdir={tmp_path / 'd'}", *base, "--override=rm:init_from={w}/rm_safety",
                        "--override=rm_safety:init_from={w}/rm"]) == 2
    assert "rm, rm_safety wait on each other" in capsys.readouterr().err
    # a failure: PPO, started beside it, finishes; nothing after them starts
    order.clear()
    fail["name"] = "rejection_sampling"
    assert recipe.main([f"--workdir={tmp_path / 'e'}", *base]) == 3
    err = capsys.readouterr().err
    assert order[-2:] == ["rejection_sampling", "ppo"] and "stage rejection_sampling failed" in err
    assert "once its cause is fixed (a setting: --override=rejection_sampling:FIELD=VALUE)" in err
    assert os.path.exists(tmp_path / "e" / "ppo" / "final_metrics.json")
    # the report holds the rows of the stages that finished
    assert f"the stages finished so far: {tmp_path / 'e' / 'report.md'}" in err
    reported = {r["stage"] for r in json.load(open(tmp_path / "e" / "report.json"))["stages"]}
    assert reported == {"pretrain", "sft", "rm", "rm_safety", "ppo"}
    order.clear()
    fail["name"] = None
    assert recipe.main([f"--workdir={tmp_path / 'e'}", *base]) == 0
    assert order == ["rejection_sampling", "gatt", "safety_distill"]
    assert recipe.main([f"--workdir={tmp_path / 'f'}", *base, "--jobs=0"]) == 2
    # --until: that stage and what it reads from; the same command without it goes on
    order.clear()
    capsys.readouterr()
    assert recipe.main([f"--workdir={tmp_path / 'g'}", *base, "--until=rm"]) == 0
    assert order == ["pretrain", "sft", "rm"] and "stopped after rm (--until)" in capsys.readouterr().out
    assert {r["stage"] for r in json.load(open(tmp_path / "g" / "report.json"))["stages"]} == {"pretrain", "sft", "rm"}
    order.clear()
    assert recipe.main([f"--workdir={tmp_path / 'g'}", *base]) == 0
    assert order == ["rm_safety", "rejection_sampling", "ppo", "gatt", "safety_distill"]
    assert recipe.main([f"--workdir={tmp_path / 'h'}", *base, "--until=dpo"]) == 2
    assert "--until=dpo: not a stage" in capsys.readouterr().err
    # a finished stage run further with its own command, stopped part-way (its final_metrics.json removed): the
    # recipe cannot resume it at its own step count, and says so before telling the user to remove the stages after
    os.remove(tmp_path / "g" / "sft" / "final_metrics.json")
    os.makedirs(tmp_path / "g" / "sft" / "checkpoints" / "99999")
    order.clear()
    assert recipe.main([f"--workdir={tmp_path / 'g'}", *base]) == 2 and order == []
    err = capsys.readouterr().err
    assert f"{tmp_path / 'g' / 'sft'}: its latest checkpoint is step 99999, past the " in err and "rm -r" not in err


def _stage_until_signalled(signalled: list):
    """A fake stage process: runs (or has exited with `code`) until it gets a signal,
    recorded in `signalled`; then exits 143, what a stage does on SIGTERM."""

    class Running:
        def __init__(self, name, code=None):
            self.name, self.returncode = name, code

        def send_signal(self, sig):
            signalled.append((self.name, sig))
            self.returncode = 143

        def poll(self):
            return self.returncode

    return Running


def test_sigterm_to_the_recipe_reaches_its_running_stages(tmp_path, monkeypatch, capsys):
    """The recipe passes SIGTERM on to the stages it runs (they save their step and exit
    143), starts no other, and exits 143; the rerun resumes them."""
    from llama_jax import recipe

    launched, signalled = [], []
    Running = _stage_until_signalled(signalled)

    def fake_launch(cmd, env, label):
        name = os.path.basename(next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir=")))
        launched.append(name)
        os.makedirs(os.path.join(tmp_path, name), exist_ok=True)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the notice, while it runs
        return Running(name)

    monkeypatch.setattr(recipe, "write_tokenizer_text", lambda path: open(path, "w").write("toy\n"))
    monkeypatch.setattr(recipe, "launch", fake_launch)
    before = signal.getsignal(signal.SIGTERM)
    assert recipe.main([f"--workdir={tmp_path}", f"--experiments={ROOT}/experiments"]) == 143
    assert launched == ["pretrain"] and signalled == [("pretrain", signal.SIGTERM)]
    out, err = capsys.readouterr()
    assert "pretrain: stopped by SIGTERM; the rerun resumes it" in out and "rerun the same command" in err
    assert "pretrain" in json.load(open(tmp_path / "timings.json"))
    assert signal.getsignal(signal.SIGTERM) == before  # the recipe's handler is gone


def test_ctrl_c_or_a_killed_stage_ends_the_recipe_with_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C: the running stages get SIGTERM (they save their step; a SIGINT can be
    swallowed by a callback and the stage runs on), exit 130 and one line, no traceback.
    A stage killed by signal N fails the recipe with 128 + N (was 256 - N). The printed
    stage command can be pasted into a shell."""
    from llama_jax import recipe

    signalled = []
    Running = _stage_until_signalled(signalled)

    def interrupted(cmd, env, label):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while it runs
        return Running("pretrain")

    monkeypatch.setattr(recipe, "write_tokenizer_text", lambda path: open(path, "w").write("toy\n"))
    monkeypatch.setattr(recipe, "launch", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (xdist workers ignore it)
    try:
        assert recipe.main([f"--workdir={tmp_path / 'my runs'}", f"--experiments={ROOT}/experiments"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    out, err = capsys.readouterr()
    assert signalled == [("pretrain", signal.SIGTERM)] and "Traceback" not in err
    assert "interrupted: the running stages save their step and stop" in err and "rerun the same command" in err
    assert "pretrain" in json.load(open(tmp_path / "my runs" / "timings.json"))
    printed = next(line for line in out.splitlines() if line.startswith("[1/8] pretrain: "))
    pasted = shlex.split(printed.split(": ", 1)[1])  # a workdir with a space survives the shell
    assert pasted[:3] == ["python", "-m", "llama_jax.main"]
    assert f"--workdir={tmp_path / 'my runs' / 'pretrain'}" in pasted
    monkeypatch.setattr(recipe, "launch", lambda cmd, env, label: Running("pretrain", -9))
    assert recipe.main([f"--workdir={tmp_path / 'b'}", f"--experiments={ROOT}/experiments"]) == 137
    assert "error: stage pretrain failed (exit 137)" in capsys.readouterr().err


def test_a_stage_ends_with_the_recipe_that_started_it(tmp_path):
    """LLAMA_JAX_PARENT_PID (the recipe's pid in its stages' environment): a stage whose
    recipe is SIGKILLed gets SIGTERM (PR_SET_PDEATHSIG), saves its step and exits, rather
    than run on and hold its workdir's lock against the rerun."""
    code = ("import os, signal, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import os, signal, sys, time; from llama_jax import main;"
            " signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], \"w\").write(\"term\"), sys.exit(0)));"
            " main.end_with_parent(); open(sys.argv[1] + \".up\", \"w\"); time.sleep(60)', sys.argv[1]],"
            " env={**os.environ, 'LLAMA_JAX_PARENT_PID': str(os.getpid())})\n"
            "while not os.path.exists(sys.argv[1] + '.up'): time.sleep(0.05)\n"
            "print(child.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    flag = tmp_path / "flag"
    out = subprocess.run([sys.executable, "-c", code, str(flag)], env=env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == -9
    deadline = time.time() + 20
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert flag.read_text() == "term"


def test_the_recipe_relays_a_stage_with_its_name(capsys):
    from llama_jax import recipe

    code = "import sys; print('loading'); sys.stdout.write('1/3\\r2/3\\r3/3\\n'); print('done', file=sys.stderr)"
    proc = recipe.launch([sys.executable, "-c", code], dict(os.environ), "[ppo]")
    assert recipe._wait_any({"ppo": (proc, 0.0, 0.0)}) == ["ppo"] and proc.returncode == 0
    assert capsys.readouterr().out.splitlines() == ["[ppo] loading", "[ppo] 3/3", "[ppo] done"]


def test_the_recipe_passes_a_seed_and_overrides_to_its_stages(tmp_path, monkeypatch, capsys):
    from llama_jax import recipe

    calls = {}

    def fake_launch(cmd, env, label):
        stage_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
        calls[os.path.basename(stage_dir)] = cmd
        return _finished_stage(cmd)

    monkeypatch.setattr(recipe, "write_tokenizer_text", lambda path: open(path, "w").write("toy\n"))
    monkeypatch.setattr(recipe, "launch", fake_launch)
    args = [f"--workdir={tmp_path}", f"--experiments={ROOT}/experiments", "--seed=3",
            "--override=ppo:ppo.beta=0.05", "--override=all:config.log_every_steps=7"]
    assert recipe.main(args) == 0
    assert set(calls) == {name for name, *_ in recipe.STAGES}
    for name, cmd in calls.items():
        assert cmd[-3:] == ["--config.seed=3", "--config.ppo.beta=0.05", "--config.log_every_steps=7"] \
            if name == "ppo" else cmd[-2:] == ["--config.seed=3", "--config.log_every_steps=7"]
        assert ("--config.ppo.beta=0.05" in cmd) == (name == "ppo")
    # after the recipe's own settings for the stage, so an override wins
    ppo = calls["ppo"]
    own = max(i for i, a in enumerate(ppo) if a.startswith("--config.rlhf.safety_reward_model="))
    assert ppo.index("--config.ppo.beta=0.05") > own
    # PPO starts from the SFT policy with RBoN's reward, beside rejection sampling
    assert f"--config.init_from={tmp_path / 'sft'}" in ppo and "--config.ppo.ref_logprob_weight=4" in ppo
    report = json.load(open(tmp_path / "report.json"))
    assert report["seed"] == 3 and report["overrides"] == ["ppo:ppo.beta=0.05", "all:config.log_every_steps=7"]
    # {w} in an override is the workdir: the paper's order, PPO on the rejection-sampled policy
    calls.clear()
    assert recipe.main([f"--workdir={tmp_path / 'paper'}", f"--experiments={ROOT}/experiments",
                        "--override=ppo:init_from={w}/rejection_sampling"]) == 0
    assert calls["ppo"][-1] == f"--config.init_from={tmp_path / 'paper' / 'rejection_sampling'}"
    # a misspelt field is refused before any stage runs (PPO starts minutes in)
    calls.clear()
    capsys.readouterr()
    assert recipe.main([f"--workdir={tmp_path / 'typo'}", f"--experiments={ROOT}/experiments",
                        "--override=ppo:ppo.betaa=1"]) == 2 and not calls
    assert "--override ppo:ppo.betaa: the ppo stage's config (ppo.py:tiny) has no field" in capsys.readouterr().err
    # a bad value is refused before any stage runs (it used to fail when its stage began, and then the recorded
    # override refused the corrected command)
    for bad, words in [("sft:total_steps=abc", "stage sft: flag --config.total_steps=abc: invalid literal for int()"),
                       ("sft:total_steps=0", "stage sft: config.total_steps must be a positive integer, got 0"),
                       ("all:mesh.rules=1", "stage pretrain: sharding rule #0"),
                       ("ppo:ppo.beta=-1.0", "stage ppo: config.ppo.beta -1.0: must be a finite number >= 0"),
                       ("ppo:model.attention=flsh", "stage ppo: config.model: LlamaConfig.attention: 'flsh' is not"),
                       ("ppo:checkpoint.max_to_keep=1", "stage ppo: config.checkpoint.max_to_keep 1 could delete"),
                       ("pretrain:eval_exact_match=10",
                        "stage pretrain: --config.eval_exact_match=10: stage pretrain does not read it"),
                       ("sft:data.synthetic_mix=0.5",
                        "stage sft: --config.data.synthetic_mix=0.5: stage sft does not read it")]:
        assert recipe.main([f"--workdir={tmp_path / 'bad'}", f"--experiments={ROOT}/experiments",
                            f"--override={bad}"]) == 2 and not calls
        assert words in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    # a stage that has begun resumes only with the settings it began with, named
    assert recipe.main([*args[:2], "--seed=4", *args[3:]]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'pretrain'} began with other settings than these flags give it (seed: 3 -> 4)" in err
    assert "remove its directory (and those of the stages after it) to rerun it" in err
    # a workdir begun before the record existed: its stages began without the flags; --seed=0 is the same run
    os.makedirs(tmp_path / "old" / "pretrain" / "checkpoints" / "20")
    assert recipe.main([f"--workdir={tmp_path / 'old'}", f"--experiments={ROOT}/experiments", "--seed=4"]) == 2
    assert "pretrain began with other settings than these flags give it (seed: 0 -> 4)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "old" / "recipe_args.json")
    assert recipe.main([f"--workdir={tmp_path / 'old'}", f"--experiments={ROOT}/experiments", "--seed=0"]) == 0
    assert json.load(open(tmp_path / "old" / "recipe_args.json")) == {"seed": 0, "overrides": [], "fast": False}
    # --fast changes every stage: a fast workdir is not resumed with the full step counts, nor the reverse
    assert recipe.main([f"--workdir={tmp_path / 'old'}", f"--experiments={ROOT}/experiments", "--fast"]) == 2
    assert "total_steps: 600 -> 30" in capsys.readouterr().err
    assert recipe.main([f"--workdir={tmp_path / 'quick'}", f"--experiments={ROOT}/experiments", "--fast"]) == 0
    assert recipe.main([f"--workdir={tmp_path / 'quick'}", f"--experiments={ROOT}/experiments"]) == 2
    assert "total_steps: 30 -> 600" in capsys.readouterr().err
    # a stage that has not begun takes new settings: PPO's, with only pretraining and SFT begun; one refused at
    # its start (its directory holds no row, checkpoint or data) too: the new flags may be its fix
    for name, *_ in recipe.STAGES[2:]:
        shutil.rmtree(tmp_path / "quick" / name)
    os.makedirs(tmp_path / "quick" / "ppo" / "checkpoints")
    open(tmp_path / "quick" / "ppo" / "metrics.jsonl", "w").close()
    os.makedirs(tmp_path / "quick" / "ppo" / "data")
    open(tmp_path / "quick" / "ppo" / "data" / "settings.json", "w").write("{}")
    calls.clear()
    assert recipe.main([f"--workdir={tmp_path / 'quick'}", f"--experiments={ROOT}/experiments", "--fast",
                        "--override=ppo:ppo.beta=0.05"]) == 0
    assert "--config.ppo.beta=0.05" in calls["ppo"] and "sft" not in calls
    assert json.load(open(tmp_path / "quick" / "recipe_args.json"))["overrides"] == ["ppo:ppo.beta=0.05"]
    # flags a workdir was begun with that are refused since (a field its stage never reads) are compared, not
    # checked: the workdir resumes without them
    os.makedirs(tmp_path / "since" / "pretrain" / "checkpoints" / "20")
    (tmp_path / "since" / "recipe_args.json").write_text(json.dumps({"seed": None, "fast": False,
                                                                      "overrides": ["ppo:sample.prompt=hi"]}))
    assert recipe.main([f"--workdir={tmp_path / 'since'}", f"--experiments={ROOT}/experiments"]) == 0
    # a record written before --fast was kept reads as a run without it
    json.dump({"seed": 0, "overrides": []}, open(tmp_path / "old" / "recipe_args.json", "w"))
    assert recipe.main([f"--workdir={tmp_path / 'old'}", f"--experiments={ROOT}/experiments", "--seed=0"]) == 0
    # malformed overrides and unknown stages are named before anything runs
    for bad, words in [("ppo.beta=0.05", "STAGE:FIELD=VALUE"), ("ppo:beta", "STAGE:FIELD=VALUE"),
                       ("dpo:beta=1", "unknown stage 'dpo'")]:
        assert recipe.main([f"--workdir={tmp_path / 'x'}", f"--override={bad}"]) == 2
        assert words in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_a_resume_keeps_the_init_from_step_it_started_from(tmp_path, reference_run, tokenizer_path):
    """DPO's reference is init_from's weights: a run records the step it started from, and
    a resume after init_from's run saved a later step goes on against the step it began
    with (its losses equal an uninterrupted run's), or is refused when that step is gone.
    A stage that reads init_from only at its start (pretraining here) resumes regardless."""
    from llama_jax import checkpoint as ckpt

    ref_dir, _ = reference_run
    base = tmp_path / "base"
    shutil.copytree(ref_dir, base)
    toy = ["--config.data.synthetic_train=64", "--config.data.synthetic_eval=16"]

    def run(workdir, steps, init_from=base, experiment="dpo.py:tiny"):
        extra = toy if experiment.startswith("dpo") else []
        out = subprocess.run(command(str(tmp_path / workdir), f"--config.data.tokenizer={tokenizer_path}", *extra,
                                     "--config.eval_steps=0", f"--config.init_from={init_from}", steps=steps,
                                     experiment=experiment), env=env(), capture_output=True, text=True, timeout=300)
        return out, {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / workdir / "metrics.jsonl"))
                     if "loss" in r} if out.returncode == 0 else None

    out, whole = run("whole", 4, init_from=ref_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    # its MFU counts DPO's FLOPs: the policy's train step and the frozen reference's forward pass (one device)
    from llama_jax.stages import STAGES

    final = json.load(open(tmp_path / "whole" / "final_metrics.json"))
    cfg = ckpt.model_config(ckpt.read_meta(str(tmp_path / "whole"))[1])
    assert final["median_mfu"] == pytest.approx(STAGES["dpo"]().flops_per_token(cfg, 64)
                                                * final["median_tokens_per_second"] / final["peak_flops_per_device"])
    out, _ = run("dpo", 2)
    assert out.returncode == 0, out.stderr[-3000:]
    began = ckpt.read_meta(str(tmp_path / "dpo"))[1]["init_from"]
    assert (began["path"], began["step"], len(began["meta_sha"])) == (str(base), 12, 16)
    assert run("pretrain", 2, experiment="pretrain.py:tiny")[0].returncode == 0
    shutil.copytree(base / "checkpoints" / "9", base / "checkpoints" / "15")  # a later step, other weights
    out, resumed = run("dpo", 4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"config.init_from {base}: now at step 15; this run started from its step 12 and goes on with it" \
        in out.stderr
    assert resumed == pytest.approx(whole, abs=1e-6)  # the reference is still step 12
    assert ckpt.read_meta(str(tmp_path / "dpo"))[1]["init_from"]["step"] == 12
    shutil.rmtree(base / "checkpoints" / "12")
    out, _ = run("dpo", 6)
    assert out.returncode != 0 and f"config.init_from {base}: this run started from its step 12, which it no " \
        "longer holds (its latest: 15)" in out.stderr, out.stderr[-2000:]
    out, _ = run("pretrain", 4, experiment="pretrain.py:tiny")
    assert out.returncode == 0 and "init_from" not in out.stderr, out.stderr[-2000:]
    # an import rewritten at the same path and step (imported again from another model): refused, not resumed
    cfg, params, _, tok = ckpt.load_model(str(tmp_path / "whole"))
    meta = {"model": cfg.to_dict(), "heads": ["lm"],
            "tokenizer": ckpt.read_meta(str(tmp_path / "whole"))[1]["tokenizer"]}
    ckpt.save_params(str(tmp_path / "imp"), params, {**meta, "source": "hf:/models/a"}, 0, tok)
    out, _ = run("dpo_imp", 2, init_from=tmp_path / "imp")
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.rmtree(tmp_path / "imp")
    # from the same source path, its files replaced by another model's: the import's id is made from its weights
    import jax

    other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    ckpt.save_params(str(tmp_path / "imp"), other, {**meta, "source": "hf:/models/a"}, 0, tok)
    # (the same weights imported again would have the same id: a resume from them goes on)
    assert ckpt.read_meta(str(tmp_path / "imp"))[1]["run"] == ckpt.weights_id(other) != ckpt.weights_id(params)
    out, _ = run("dpo_imp", 4, init_from=tmp_path / "imp")
    assert out.returncode != 0 and f"config.init_from {tmp_path / 'imp'}: its step 0 is not the checkpoint this run " \
        "began with" in out.stderr, out.stderr[-2000:]
    # every run's checkpoints carry its own id: another run's, retrained or copied to the same path and step, has
    # another metadata digest (two runs of one config had the same)
    ids = [ckpt.read_meta(str(tmp_path / w))[1]["run"] for w in ("pretrain", "dpo", "whole")]
    assert len(set(ids)) == 3 and ids[0] == (tmp_path / "pretrain" / "run_id").read_text().strip()
    # and the seq_len it trained at, which an export keeps (evaluate's and chat's default length)
    from llama_jax.evaluate import trained_seq_len

    ckpt.export_params(str(tmp_path / "pretrain"), str(tmp_path / "exported"))
    assert not os.path.exists(tmp_path / "exported" / "config.json")
    assert trained_seq_len(str(tmp_path / "exported")) == trained_seq_len(str(tmp_path / "pretrain")) == 64
    assert ckpt.read_meta(str(tmp_path / "exported"))[1]["run"] == ids[0]  # an export keeps its run's id
    # a resume at a shorter seq_len keeps the longest rows its weights saw before (it recorded the resume's 32)
    shutil.copytree(ref_dir, tmp_path / "shorter")
    out = subprocess.run(command(str(tmp_path / "shorter"), f"--config.data.tokenizer={tokenizer_path}",
                                 "--config.seq_len=32", "--config.eval_steps=0", steps=13), env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and ckpt.read_meta(str(tmp_path / "shorter"))[0] == 13, out.stderr[-2000:]
    assert trained_seq_len(str(tmp_path / "shorter")) == 64
    # another reference on a resume is refused (it changed the objective mid-run with a warning); the one the run
    # began with, moved, is taken (pairs of one's own: the toy data records init_from among its settings)
    shutil.copytree(ref_dir, tmp_path / "ref")

    def own(steps, init_from, workdir="dpo_ref"):
        return subprocess.run(command(str(tmp_path / workdir), f"--config.data.tokenizer={tokenizer_path}",
                                      f"--config.data.source={tmp_path / 'whole' / 'data' / 'preference_train.jsonl'}",
                                      "--config.eval_steps=0", f"--config.init_from={init_from}", "--config.seq_len=32",
                                      steps=steps,
                                      experiment="dpo.py:tiny"), env=env(), capture_output=True, text=True, timeout=300)

    assert own(2, tmp_path / "ref").returncode == 0
    # the longest rows its weights saw: the reference's 64, not its own 32
    assert ckpt.read_meta(str(tmp_path / "dpo_ref"))[1]["trained_seq_len"] == 64
    out = own(4, tmp_path / "whole")
    assert out.returncode != 0 and f"config.init_from {tmp_path / 'whole'}: this run began from {tmp_path / 'ref'} " \
        f"(its step 12), the reference it trains against" in out.stderr, out.stderr[-2000:]
    shutil.move(tmp_path / "ref", tmp_path / "ref_moved")
    out = own(4, tmp_path / "ref_moved")
    assert out.returncode == 0 and f"has the metadata of the checkpoint this run began from ({tmp_path / 'ref'}, " \
        "gone: moved here)" in out.stderr, out.stderr[-2000:]
    out = own(6, ref_dir)  # the original it was copied from: the same run's checkpoint (its id says so)
    assert out.returncode == 0 and f"({tmp_path / 'ref_moved'}, a copy): taken as that checkpoint" in out.stderr, \
        out.stderr[-2000:]
    # the same checkpoint by another name (a symlink to an import), on the toy pairs: their data settings do not
    # hold init_from (DPO's data is not its answers), so the resume reaches the reference check, which takes it
    ckpt.save_params(str(tmp_path / "imp2"), params, {**meta, "source": "hf:/models/c"}, 12, tok)
    assert run("dpo_link", 2, init_from=tmp_path / "imp2")[0].returncode == 0
    os.symlink(tmp_path / "imp2", tmp_path / "imp2_link")
    out, _ = run("dpo_link", 4, init_from=tmp_path / "imp2_link")
    assert out.returncode == 0 and "taken as that checkpoint" not in out.stderr, out.stderr[-2000:]
    shutil.move(tmp_path / "imp2", tmp_path / "imp2_moved")  # moved: another real path, the same checkpoint
    out, _ = run("dpo_link", 6, init_from=tmp_path / "imp2_moved")
    assert out.returncode == 0 and "gone: moved here" in out.stderr, out.stderr[-2000:]


def test_a_resume_never_deletes_the_checkpoints_keep_period_kept(tmp_path, tokenizer_path):
    """Orbax applies a run's retention to every checkpoint in its directory: a resume that
    forgot `checkpoint.keep_period` deleted the milestones the first run kept. Refused,
    with the flag that keeps them; a divisor of the old period keeps them too."""
    workdir = str(tmp_path)
    args = command(workdir, f"--config.data.tokenizer={tokenizer_path}", "--config.checkpoint_every_steps=2",
                   "--config.checkpoint.max_to_keep=1", steps=6)
    first = subprocess.run(args + ["--config.checkpoint.keep_period=4"], env=env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["4", "6"]
    forgot = subprocess.run(args + ["--config.total_steps=10"], env=env(), capture_output=True, text=True,
                            timeout=300)
    assert forgot.returncode == 1 and (f"{workdir}/checkpoints: steps 4 were kept by checkpoint.keep_period 4, "
                                       "which this run's 0 would delete at its next saves; rerun with "
                                       "--config.checkpoint.keep_period=4") in forgot.stderr, forgot.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["4", "6"]
    kept = subprocess.run(args + ["--config.total_steps=10", "--config.checkpoint.keep_period=2"], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["4", "6", "8", "10"]
