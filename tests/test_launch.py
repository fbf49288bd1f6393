"""Scale-out as a user runs it: several processes on localhost with jax.distributed (the
TPU-pod code path), a checkpoint moving between process counts, the ahead-of-time memory
check of a real preset, and sweeps with their comparison table."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from procs import ROOT, SMALL, env, losses

from llama_jax import compare

AOT = f"{ROOT}/launch/aot_compile.py"
SYNTHETIC = [*SMALL, "--config.batch_size=8", "--config.data.source=synthetic", "--config.sample.prompt=def"]


def main_args(workdir, tokenizer, steps):
    return [f"--config={ROOT}/experiments/pretrain.py:tiny", f"--workdir={workdir}", f"--config.total_steps={steps}",
            f"--config.data.tokenizer={tokenizer}", *SYNTHETIC]


def uneven_held_out(path, tokenizer_path, rows: int, seq_len: int) -> str:
    """Two documents: the first (process 0's shard) fills three batches of rows x seq_len
    tokens, the second (process 1's) one and a half."""
    from llama_jax.tokenizer import Tokenizer

    tok, batch = Tokenizer(tokenizer_path), rows * seq_len
    docs = []
    for batches in (3.5, 1.5):
        words = []
        while len(tok.encode(" ".join(words), bos=True, eos=True)) < batches * batch:
            words.append(f"value{len(words) % 97} = {len(words)}")
        docs.append(" ".join(words))
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return str(path)


def test_two_processes_train_like_one_and_hand_over_their_checkpoint(tmp_path, tokenizer_path):
    """2 processes x 4 devices == 1 process x 8 devices, step by step (the synthetic
    source gives each global batch the same rows whatever the process count; only the
    order of rows in the batch, hence float32 summation order, differs). Then 1 process
    resumes the 2-process run from its checkpoint and continues.

    The 2-process run also evaluates held-out documents whose shards hold different
    numbers of batches (process 0's three, process 1's one): both processes must stop
    after the batch they both have, or process 0 would wait forever in a collective."""
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    held_out = uneven_held_out(tmp_path / "held_out.jsonl", tokenizer_path, rows=4, seq_len=64)
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--devices_per_process=4",
                          "--timeout=200", "--", *main_args(multi, tokenizer_path, 6),
                          f"--config.data.eval_source=jsonl:{held_out}", "--config.eval_steps=10"],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 6/6" in out.stderr and "sample:" in out.stderr
    final = json.load(open(os.path.join(multi, "final_metrics.json")))
    assert 0 < final["eval_loss"] < 10, final
    assert "[p1] step" not in out.stderr + out.stdout  # only process 0 reports progress
    one = subprocess.run([sys.executable, "-m", "llama_jax.main", *main_args(single, tokenizer_path, 6)],
                         env={**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = losses(multi), losses(single)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
    saved = os.path.join(multi, "checkpoints", "6", "data")
    state = json.load(open(os.path.join(saved, os.listdir(saved)[0])))
    assert len(state["processes"]) == 2  # each process's input pipeline position

    more = subprocess.run([sys.executable, "-m", "llama_jax.main", *main_args(multi, tokenizer_path, 9)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from step 6" in more.stdout and "written by 2 processes and this run has 1" in more.stdout
    assert [s for s, _ in losses(multi)] == list(range(1, 10))
    assert sorted(os.listdir(os.path.join(multi, "checkpoints")), key=int)[-1] == "9"


def test_sigterm_to_a_two_process_job_saves_one_step_on_both(tmp_path, tokenizer_path):
    """The launcher passes SIGTERM on to both processes; JAX's preemption sync point gives
    them one step to save together (each process's pipeline position in it), then both
    exit 143."""
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2",
                             "--devices_per_process=4", "--timeout=250", "--",
                             *main_args(workdir, tokenizer_path, 1000), "--config.checkpoint_every_steps=1000"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 200
    while proc.poll() is None and time.time() < deadline and not (
            os.path.exists(metrics_path) and '"step": 3' in open(metrics_path).read()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=250)
    assert proc.returncode == 143, err[-3000:]
    steps = re.findall(r"preempted \(SIGTERM\) at step (\d+)", err)
    assert len(steps) == 2 and steps[0] == steps[1], err[-3000:]  # both processes, the same step
    saved = os.path.join(workdir, "checkpoints", steps[0], "data")
    assert len(json.load(open(os.path.join(saved, os.listdir(saved)[0])))["processes"]) == 2


def test_a_batch_the_processes_cannot_split_is_refused(tmp_path, tokenizer_path):
    """Batch 6 over 2 processes x 2 devices: the batch axis has 4 shards, so rows would be
    replicated across processes that each read their own; refused before any step."""
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--devices_per_process=2",
                          "--timeout=100", "--", *main_args(str(tmp_path / "run"), tokenizer_path, 2),
                          "--config.batch_size=6"], env=env(), capture_output=True, text=True, timeout=200)
    assert out.returncode != 0
    assert "config.batch_size 6 must be divisible by the 4 shards of the batch axis" in out.stderr, out.stderr[-3000:]
    assert "step 1/" not in out.stderr
    # every process fails alike and says so in one line: none is killed mid-exit by the lead's coordination
    # service ending first (a 40-line "Terminating process" dump), none needs stopping by the launcher
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert sorted(line.split("error: config.batch_size 6")[0] for line in lines) == ["", "[p1] "], out.stderr[-3000:]
    # tensor parallelism across the processes leaves the batch axis fewer shards than processes: said as such
    # (it read "batch_size 8 must be divisible by the 1 shards ...", which it is)
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--devices_per_process=2",
                          "--timeout=100", "--", *main_args(str(tmp_path / "run"), tokenizer_path, 2),
                          "--config.mesh.fsdp=1", "--config.mesh.tensor=4"], env=env(), capture_output=True,
                         text=True, timeout=200)
    assert out.returncode != 0 and ("error: config.mesh: the batch axis (data x fsdp) has 1 shard, which the 2 "
                                    "processes cannot split") in out.stderr, out.stderr[-3000:]
    # a workdir another run holds (its lock, taken by the lead): every process refuses at once, in one line
    import fcntl

    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2",
                              "--devices_per_process=2", "--timeout=100", "--",
                              *main_args(str(busy), tokenizer_path, 2)], env=env(), capture_output=True, text=True,
                             timeout=200)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and sorted(line.split("error: ")[0] for line in lines) == ["", "[p1] "], out.stderr
    assert all("another run is using this workdir" in line for line in lines), out.stderr


def test_local_launcher_fails_the_job_when_one_process_dies(tmp_path):
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.time()
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=3", "--", "python", "-c",
                          script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "process 1 exited with code 3; stopping the others" in out.stderr
    assert time.time() - start < 30  # the sleeping processes were stopped, not waited for
    # killed by a signal: 128 + N, as a shell reports it (was 256 - N); only gloo's own lines are filtered
    script = ("import os, sys, time\n"
              "print('The router is connected to the net'); print('Rank 0 is connected to 1 peer ranks'); "
              "print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1'); "
              "print('[Gloo] Rank 0 is connected to 1 peer ranks', "
              "file=sys.stderr); print('a port is connected to 2 peer ranks?', file=sys.stderr); sys.stdout.flush()\n"
              "if os.environ['JAX_PROCESS_ID'] == '1': os.kill(os.getpid(), 9)\n"
              "time.sleep(60)\n")
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--", "python", "-c",
                          script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 137 and "process 1 exited with code 137" in out.stderr
    assert out.stdout.count("The router is connected to the net") == 2 and "[Gloo]" not in out.stderr
    assert out.stdout.count("Rank 0 is connected to 1 peer ranks") == 2 and "[Gloo]" not in out.stdout  # a
    # program's own line is kept, gloo's (on stdout in this JAX) left out
    assert out.stderr.count("a port is connected to 2 peer ranks?") == 2
    # the first to fail is reported (process 0 failing after it, as a peer does when a collective breaks, is not)
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1': os.kill(os.getpid(), 9)\n"
              "time.sleep(1); sys.exit(1)\n")
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--", "python", "-c",
                          script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 137 and "process 1 exited with code 137 (killed by signal 9)" in out.stderr


def test_a_broken_collective_is_one_line_in_a_multi_process_job(monkeypatch, capsys):
    """A process whose peer failed first gets a runtime error from the collective it was
    in: one line saying so, not a 40-line traceback; other errors keep their traceback."""
    import jax

    from llama_jax import distributed, main

    broken = jax.errors.JaxRuntimeError("UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED\nmore")
    assert main._peer_gone(broken) and not main._peer_gone(KeyError("Gloo"))
    # process_allgather's failure when a peer is gone reaches Python as a ValueError
    assert main._peer_gone(ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]"))
    assert main._peer_gone(RuntimeError("Gloo AllGather failed: Connection closed by peer"))
    assert not main._peer_gone(ValueError("config.seq_len: abc is not an int"))
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(distributed, "is_lead", lambda: False)
    monkeypatch.setattr(main, "_CONFIG", type("C", (), {"value": type("V", (), {"stage": "pretrain"})()})())
    monkeypatch.setattr(main, "_WORKDIR", type("W", (), {"value": "w"})())
    monkeypatch.setattr(distributed, "initialize", lambda: True)
    monkeypatch.setattr(main.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    for error, said in ((broken, "error: a collective with the job's other processes failed (JaxRuntimeError: "
                                 "UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED): another process "
                                 "failed first (its error says why), or the processes cannot reach each other (the "
                                 "coordinator address, a firewall)\n"),
                        (KeyError("x"), "Traceback")):
        monkeypatch.setattr(main, "run", lambda config, workdir, e=error: (_ for _ in ()).throw(e))
        with pytest.raises(SystemExit) as exited:  # (os._exit here: the process would end without teardown)
            main.main(["main"])
        err = capsys.readouterr().err
        assert exited.value.code == 1 and ((err == said) if said.startswith("error") else err.startswith(said)), err


def test_local_launcher_keeps_progress_lines_and_sigint_in_a_background_job():
    """A progress line redrawn with carriage returns stays one line per process (each part
    prefixed; text mode had turned every \r into a line of its own), and children of a
    launcher started as a shell's background job (SIGINT ignored) get SIGINT back, so the
    SIGINT it sends on stops them (they had inherited the ignore, and trained on)."""
    script = ("import signal, sys\n"
              "print('ignored', signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
              "sys.stdout.write('\\rstep 1/2\\rstep 2/2\\n')\n")
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--", "python", "-c",
                          script], capture_output=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    parts = re.findall(rb"[^\r\n]*[\r\n]", out.stdout)  # the two processes' lines may interleave
    assert out.returncode == 0 and [p for p in parts if not p.startswith(b"[p1] ")] == [
        b"ignored False\n", b"\r", b"step 1/2\r", b"step 2/2\n"], out
    assert [p for p in parts if p.startswith(b"[p1] ")] == [
        b"[p1] ignored False\n", b"[p1] \r", b"[p1] step 1/2\r", b"[p1] step 2/2\n"], out


def test_one_process_commands_refuse_to_run_as_part_of_a_job(tmp_path, monkeypatch, capsys):
    """generate, chat, evaluate, convert, checkpoint, prepare and tokenizer load or write
    everything in each process: under a launcher they would print, write and read once per
    process (two processes raced on one export). Process 0 says so; the others exit quietly."""
    out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--", "-m",
                          "llama_jax.generate", f"--checkpoint={tmp_path}", "--prompt=x"],
                         capture_output=True, text=True, timeout=120, env=env())
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("python -m llama_jax.generate runs as one process, on all of this host's devices; it "
                            "was started as one of 2 processes of a job") == 1 and "[p1]" not in out.stderr
    from llama_jax import chat, checkpoint, convert, evaluate, recipe, tokenizer
    from llama_jax.data import prepare

    for k, v in {"LLAMA_JAX_DISTRIBUTED": "auto", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
                 "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(k, v)  # an srun step of 4 tasks
    for main, args in ((chat.main, [f"--checkpoint={tmp_path}"]),
                       (evaluate.main, [f"--checkpoint={tmp_path}", "--task=perplexity", "--data=stdlib"]),
                       (convert.main, ["--to=hf", f"--src={tmp_path}", f"--dst={tmp_path}/hf"]),
                       (checkpoint.main, ["info", str(tmp_path)]),
                       (prepare.main, ["--source=stdlib", f"--tokenizer={tmp_path}/t", f"--output={tmp_path}/s"]),
                       (tokenizer.main, ["encode", f"--model={tmp_path}/t", "--text=x"]),
                       (recipe.main, [f"--workdir={tmp_path}/recipe"])):  # each process would start every stage
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and "one of 4 processes" in capsys.readouterr().err, main.__module__
    assert not os.path.exists(tmp_path / "recipe")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # an sbatch script outside srun (SLURM_NTASKS 4): one process
    assert checkpoint.main(["info", str(tmp_path)]) == 2 and "runs as one process" not in capsys.readouterr().err
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: runs (and fails on the missing checkpoint)
    assert checkpoint.main(["info", str(tmp_path)]) == 2 and "runs as one process" not in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "s")


def test_aot_compile_of_the_7b_preset_on_8_devices(tmp_path):
    report = str(tmp_path / "aot.json")
    out = subprocess.run([sys.executable, AOT, f"--config={ROOT}/experiments/pretrain.py:7b",
                          "--num_devices=8", "--chip=v5p", "--config.grad_accum_steps=64", f"--json={report}"],
                         env={k: v for k, v in env().items() if k != "XLA_FLAGS"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.load(open(report))
    assert r["params"] == 6_738_415_616 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # parameters + AdamW moments in float32, split 8 ways, plus this device's slice of the batch
    batch = 5 * 1024 * 4096 * 4 / 8
    assert abs(r["argument_bytes"] - (r["state_bytes_total"] / 8 + batch)) < 0.01 * r["argument_bytes"]
    assert r["state_bytes_total"] == 3 * 4 * r["params"] + 16  # params, mu, nu + step/count/nonfinite scalars
    assert r["temp_bytes"] > 0 and r["total_bytes"] > r["argument_bytes"]
    assert "6.74B params" in out.stdout and "v5p: 95 GiB per chip" in out.stdout

    bad = subprocess.run([sys.executable, AOT, f"--config={ROOT}/experiments/pretrain.py:7b",
                          "--num_devices=8", "--config.mesh.tensor=3"], env=env(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "not divisible" in bad.stderr and "Traceback" not in bad.stderr
    # what a run would refuse at its start (check_config, check_overrides) is refused, not compiled
    for flag, said in (("--config.batch_size=0", "config.batch_size must be a positive integer, got 0"),
                       ("--config.model.dtype=float8", "LlamaConfig.dtype: 'float8' is not one of"),
                       ("--config.eval_exact_match=3", "stage pretrain does not read it")):
        bad = subprocess.run([sys.executable, AOT, f"--config={ROOT}/experiments/pretrain.py:tiny",
                              "--num_devices=8", flag], env=env(), capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and said in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]

    # a fine-tuning preset whose init_from is not here checks the architecture it names (2 of 7B's layers)
    sft = subprocess.run([sys.executable, AOT, f"--config={ROOT}/experiments/sft.py:7b", "--num_devices=8",
                          "--config.model.n_layers=2", "--chip=h100", f"--json={report}"],
                         env={k: v for k, v in env().items() if k != "XLA_FLAGS"}, capture_output=True, text=True,
                         timeout=300)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert "model: config.model (config.init_from /path/to/pretrained is not here)" in sft.stdout
    assert "attention: compiled here as XLA einsums" in sft.stdout  # a GPU runs cuDNN's kernel: said, for h100
    assert "attention: compiled" not in out.stdout  # v5p: the same XLA attention as here
    from llama_jax.model import LlamaConfig

    assert json.load(open(report))["params"] == LlamaConfig.llama2_7b().replace(n_layers=2).num_params()


def test_sweep_runs_every_combination_and_compare_tabulates_them(tmp_path, tokenizer_path):
    root = str(tmp_path / "sweep")
    base = [f"--config={ROOT}/experiments/pretrain.py:tiny", f"--workdir={root}",
            "--sweep=optimizer.learning_rate=1e-3,1e-2", "--sweep=model.n_layers=1"]
    extra = ["--", "--config.total_steps=3", f"--config.data.tokenizer={tokenizer_path}", *SYNTHETIC]
    printed = subprocess.run([sys.executable, f"{ROOT}/launch/sweep.py", *base, "--launcher=print", *extra],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 2 and "learning_rate=1e-3_n_layers=1" in lines[0]
    assert lines[1].endswith("--config.optimizer.learning_rate=1e-2 --config.model.n_layers=1")

    out = subprocess.run([sys.executable, f"{ROOT}/launch/sweep.py", *base, *extra], env=env(),
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(os.path.join(root, d) for d in os.listdir(root))
    assert [os.path.basename(r) for r in runs] == ["learning_rate=1e-2_n_layers=1", "learning_rate=1e-3_n_layers=1"]
    again = subprocess.run([sys.executable, f"{ROOT}/launch/sweep.py", *base, *extra], env=env(),
                           capture_output=True, text=True, timeout=60)
    assert again.stdout.count("finished before, skipped") == 2

    shown = subprocess.run([sys.executable, "-m", "llama_jax.compare", *runs, "--sort=loss"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    header, _, *rows = shown.stdout.strip().splitlines()
    assert [c.strip() for c in header.split(" | ")][:3] == ["run", "optimizer.learning_rate", "step"]
    final = {r: losses(r)[-1][1] for r in runs}
    best = min(final, key=final.get)
    assert rows[0].startswith(os.path.basename(best)) and f"{final[best]:.4g}" in rows[0]


def test_sweep_gives_every_combination_its_own_workdir(tmp_path):
    """Values a directory name cannot tell apart (`a/b`, `a-b`) would share one workdir,
    and the second would be skipped as finished: both get a hash. A repeated value is refused."""
    sweep = [sys.executable, f"{ROOT}/launch/sweep.py", f"--config={ROOT}/experiments/pretrain.py:tiny",
             f"--workdir={tmp_path}"]
    printed = subprocess.run([*sweep, "--sweep=data.source=text:a/b,text:a-b", "--sweep=seed=0", "--launcher=print"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    workdirs = [re.search(r"--workdir=(\S+)", line).group(1) for line in printed.stdout.splitlines()]
    assert len(workdirs) == len(set(workdirs)) == 2
    assert all(re.fullmatch(r".*/source=text-a-b_seed=0_[0-9a-f]{6}", w) for w in workdirs)
    twice = subprocess.run([*sweep, "--sweep=seed=0,0"], capture_output=True, text=True, timeout=60)
    assert twice.returncode == 2 and "--sweep='seed=0,0': a value is listed twice" in twice.stderr
    # fields sharing a last part are named whole; values with commas are separated by semicolons; a long name is cut
    printed = subprocess.run([*sweep, "--sweep=rlhf.temperature=0.5", "--sweep=sample.temperature=0.7",
                              "--sweep=gatt.eval_turns=2,4;6,20", f"--sweep=data.source={'x' * 200}",
                              "--launcher=print"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    workdirs = [re.search(r"--workdir=(\S+)", line).group(1) for line in printed.stdout.splitlines()]
    assert [os.path.basename(w)[:62] for w in workdirs] == [
        "rlhf.temperature=0.5_sample.temperature=0.7_eval_turns=2-4_sou",
        "rlhf.temperature=0.5_sample.temperature=0.7_eval_turns=6-20_so"]
    assert all(len(os.path.basename(w)) == 120 + 7 for w in workdirs)
    assert "--config.gatt.eval_turns=2,4" in printed.stdout.splitlines()[0]


def test_sweep_checks_every_run_first_and_refuses_a_directory_of_other_flags(tmp_path, tokenizer_path):
    """Every combination is checked as its run would be before any runs (a bad value in
    the last one used to stop the sweep after the others trained); a rerun whose flags for
    a finished run differ is refused (it was skipped as finished); a signal reaches the run."""
    base = [sys.executable, f"{ROOT}/launch/sweep.py", f"--config={ROOT}/experiments/pretrain.py:tiny",
            f"--workdir={tmp_path}"]
    shared = ["--", "--config.total_steps=2", f"--config.data.tokenizer={tokenizer_path}", *SYNTHETIC]
    bad = subprocess.run([*base, "--sweep=optimizer.learning_rate=1e-3,abc", *shared], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "learning_rate=abc: flag --config.optimizer.learning_rate=abc" in bad.stderr
    zero = subprocess.run([*base, "--sweep=total_steps=2,0", *shared[:1], *shared[2:]], env=env(),
                          capture_output=True, text=True, timeout=120)
    assert zero.returncode == 2 and "total_steps=0: config.total_steps must be a positive integer" in zero.stderr
    assert not os.listdir(tmp_path)  # nothing ran
    ok = subprocess.run([*base, "--sweep=seed=1", *shared], env=env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.load(open(tmp_path / "seed=1" / "sweep_run.json"))["args"][-1] == "--config.seed=1"
    other = subprocess.run([*base, "--sweep=seed=1", *shared, "--config.optimizer.warmup_steps=0"], env=env(),
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and f"{tmp_path / 'seed=1'} was begun with other flags " \
        "(--config.optimizer.warmup_steps=0)" in other.stderr
    # a run that failed before it saved anything does not hold its directory against a corrected rerun; absl's own
    # flags (which main takes) pass the check
    failed = subprocess.run([*base, "--sweep=seed=2", *shared, "--config.data.source=text:/nonexistent/*.txt"],
                            env=env(), capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and os.path.exists(tmp_path / "seed=2" / "sweep_run.json"), failed.stderr[-2000:]
    printed = subprocess.run([*base, "--sweep=seed=2", *shared, "--verbosity=0"], env=env(), capture_output=True,
                             text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    # a finished combination run further with its own command and stopped (no final_metrics.json, checkpoints past
    # the sweep's steps): refused up front, not failed when its turn comes
    os.remove(tmp_path / "seed=1" / "final_metrics.json")
    os.makedirs(tmp_path / "seed=1" / "checkpoints" / "50")
    further = subprocess.run([*base, "--sweep=seed=1", *shared], env=env(), capture_output=True, text=True,
                             timeout=120)
    assert further.returncode == 2 and f"{tmp_path / 'seed=1'}: its latest checkpoint is step 50, past the 2 steps " \
        "the sweep runs it for" in further.stderr, further.stderr[-2000:]
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_script", f"{ROOT}/launch/sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)\n")
    real = sweep.subprocess.Popen
    try:  # the sweep's SIGTERM reaches the run, and the run's exit code comes back
        sweep.subprocess.Popen = lambda cmd, **kw: real([sys.executable, "-c", code], **kw)
        start = time.time()
        assert sweep.run([]) == 143 and time.time() - start < 20
        # a Ctrl-C to the sweep reaches the run as SIGTERM (it saves its step); the sweep says Ctrl-C: 130
        sweep.subprocess.Popen = lambda cmd, **kw: real([sys.executable, "-c", code.replace(
            "signal.SIGTERM); time", "signal.SIGINT); time")], **kw)
        assert sweep.run([]) == 130
        sweep.subprocess.Popen = lambda cmd, **kw: real([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
        assert sweep.run([]) == 137  # killed by signal 9: 128 + 9
    finally:
        sweep.subprocess.Popen = real


def test_compare_reports_final_and_best_and_names_bad_directories(tmp_path):
    def run(name, lr, evals, cut=False):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"optimizer": {"learning_rate": lr}, "seed": 0}))
        rows = [{"step": 10 * (i + 1), "loss": 5.0 - i, "eval_loss": e, "eval_exact_match": 0.1 * i}
                for i, e in enumerate(evals)]
        text = "\n".join(json.dumps(r) for r in rows) + "\n" + ('{"step": 99, "lo' if cut else "")
        (d / "metrics.jsonl").write_text(text)
        return str(d)

    a = run("a", 1e-3, [3.0, 2.0, 2.5])
    b = run("b", 3e-3, [2.8, 2.9], cut=True)  # killed mid-write: the cut last line is ignored
    summary = compare.summarize(compare.load_run(a), ["loss", "eval_loss", "eval_exact_match"])
    assert summary == {"step": 30, "status": "unfinished", "loss": 3.0, "eval_loss": 2.5, "best eval_loss": 2.0,
                       "eval_exact_match": 0.2, "best eval_exact_match": 0.2}
    (tmp_path / "a" / "final_metrics.json").write_text("{}")
    assert compare.summarize(compare.load_run(a), ["loss"])["status"] == "finished"
    text = compare.table([b, a], sort="eval_loss")
    header, _, first, second = text.splitlines()
    assert "optimizer.learning_rate" in header and "seed" not in header
    assert first.startswith("a ") and second.startswith("b ")  # best eval_loss 2.0 < 2.8
    for name in ("eval_violation_rate", "eval_false_refusal_rate", "eval_kl", "loss", "eval_safety_bce",
                 "eval_rejected_reward"):  # the safety rates too, and DPO's reward of the rejected answers
        assert not compare.higher_is_better(name), name
    assert compare.higher_is_better("eval_exact_match") and compare.higher_is_better("eval_reward")
    with pytest.raises(compare.CompareError, match=r"--metrics: \['eval_los'\] logged by none of the runs"):
        compare.table([a, b], ["eval_los"])
    with pytest.raises(compare.CompareError, match=r"--sort=status: not one of the metric columns"):
        compare.table([a, b], sort="status")  # a text column: it was a TypeError traceback
    # a run that failed before logging is left out with a note (it made the sweep's own compare command fail)
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "llama_jax.compare", a, str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"note: left out {tmp_path / 'empty'}: no metrics.jsonl" in out.stderr
    assert len(out.stdout.strip().splitlines()) == 3
    out = subprocess.run([sys.executable, "-m", "llama_jax.compare", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"{tmp_path / 'empty'}: no metrics.jsonl" in out.stderr
    # step 0 (a PPO run's evaluation before training) is no candidate for best; standard errors get no best
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 0, "eval_kl": 0.0, "eval_reward_se": 0.1}, {"step": 4, "eval_kl": 0.3, "eval_reward_se": 0.2},
        {"step": 8, "eval_kl": 0.2, "eval_reward_se": 0.3})))
    summary = compare.summarize(compare.load_run(str(ppo)), ["eval_kl", "eval_reward_se"])
    assert summary["best eval_kl"] == 0.2 and "best eval_reward_se" not in summary
    # runs of one name in two sweeps are told apart by their paths
    for sweep_dir in ("s1", "s2"):
        (tmp_path / sweep_dir).mkdir()
        shutil.copytree(a, tmp_path / sweep_dir / "beta=0.1")
    rows = compare.table([str(tmp_path / "s1" / "beta=0.1"), str(tmp_path / "s2" / "beta=0.1")]).splitlines()[2:]
    assert rows[0].startswith("s1/beta=0.1") and rows[1].startswith("s2/beta=0.1")
    # a run with no best (its only evaluation at step 0) sorts by its final value, not last
    (ppo / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 2.5}) + "\n")
    assert compare.table([a, b, str(ppo)], sort="eval_loss").splitlines()[3].startswith("ppo ")  # 2.0, 2.5, 2.8

    def seeded(name, lr, seed, final):
        d = tmp_path / "seeds" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"optimizer": {"learning_rate": lr}, "seed": seed}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": final}) + "\n")
        return str(d)

    runs = [seeded("lo0", 1e-3, 0, 3.0), seeded("lo1", 1e-3, 1, 2.0), seeded("hi0", 1e-2, 0, 1.0),
            seeded("hi1", 1e-2, 1, 1.5), seeded("hi2", 1e-2, 2, 2.0)]
    (tmp_path / "seeds" / "hi0" / "final_metrics.json").write_text("{}")
    header, _, first, second = compare.table(runs, sort="loss", average_over=["seed"]).splitlines()
    assert [c.strip() for c in header.split(" | ")] == ["run", "optimizer.learning_rate", "runs", "step", "status",
                                                        "loss"]
    # lr 1e-2: mean 1.5, sample sd 0.5, se 0.5 / sqrt(3) = 0.29; lr 1e-3: 2.5 +- 0.5
    assert [c.strip() for c in first.split(" | ")] == ["hi0, hi1, hi2", "0.01", "3", "4", "1/3 finished",
                                                       "1.5 +- 0.29"]
    assert [c.strip() for c in second.split(" | ")][-1] == "2.5 +- 0.5"
    (tmp_path / "seeds" / "hi2" / "metrics.jsonl").write_text(json.dumps({"step": 4}) + "\n")  # no loss logged
    row = compare.table(runs, sort="loss", average_over=["seed"]).splitlines()[2]
    assert row.split(" | ")[-1].strip() == "1.25 +- 0.25 (2 of 3)"  # the mean of the runs that logged it
    # a run further on than another of its setting: both read at the fewer steps (lo1 at step 2 had 2.6, at 6 0.5)
    (tmp_path / "seeds" / "lo1" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": v}) + "\n" for s, v in ((2, 2.6), (4, 2.0), (6, 0.5))))
    (tmp_path / "seeds" / "lo0" / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 3.0}) + "\n")
    notes = []
    row = [c.strip() for c in compare.table(runs, average_over=["seed"], notes=notes).splitlines()[2].split(" | ")]
    assert row[0] == "lo0, lo1" and row[3] == "2" and row[-1] == "2.8 +- 0.2"  # (3.0 + 2.6) / 2, not 3.0 and 0.5
    assert notes == ["lo0, lo1: every run read at step 2, where lo0 is (the others ran further)"]
    with pytest.raises(compare.CompareError, match=r"--average_over: \['sed'\] in no run's config.json"):
        compare.table(runs, average_over=["sed"])


def test_a_process_per_node_job_drives_all_its_gpus(monkeypatch):
    """Under SLURM, jax.distributed.initialize() alone gives a process the one GPU of its
    local rank; the SLURM script's one process per node passes all of the node's."""
    import jax

    from llama_jax import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLAMA_JAX_DISTRIBUTED", "auto")
    monkeypatch.setenv("LLAMA_JAX_LOCAL_DEVICE_IDS", "0,1,2,3,4,5,6,7")
    assert distributed.initialize() and calls == [{"local_device_ids": list(range(8))}]
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    monkeypatch.delenv("LLAMA_JAX_LOCAL_DEVICE_IDS")
    assert distributed.initialize() and calls[-1] == {"local_device_ids": None}  # JAX's own choice
    # environment mistakes are one error naming the variable, not a silent one-process run or a raw JAX error

    def no_cluster(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    for env_vars, words in (({"LLAMA_JAX_DISTRIBUTED": "yes"}, "LLAMA_JAX_DISTRIBUTED='yes': expected auto"),
                            ({"LLAMA_JAX_DISTRIBUTED": "auto"}, "LLAMA_JAX_DISTRIBUTED=auto: no multi-process job "
                                                                "found in this environment"),
                            ({"LLAMA_JAX_DISTRIBUTED": "", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
                             "set but not JAX_PROCESS_ID: set it to this process's index"),
                            ({"LLAMA_JAX_DISTRIBUTED": "", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2: expected 0 .. 1"),
                            ({"JAX_NUM_PROCESSES": "two"}, "expected whole numbers")):
        monkeypatch.setattr(distributed, "_INITIALIZED", False)
        for k, v in env_vars.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ValueError, match=re.escape(words)):
            distributed.initialize()
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "LLAMA_JAX_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    script = open(f"{ROOT}/launch/gpu_slurm.sbatch").read()
    assert "#SBATCH --ntasks-per-node=1" in script and "export LLAMA_JAX_LOCAL_DEVICE_IDS" in script
    lines = [line for line in script.splitlines() if line.startswith(("GPUS=", "LLAMA_JAX_LOCAL_DEVICE_IDS="))]
    for gpus, ids in (("8", "0,1,2,3,4,5,6,7"), ("4", "0,1,2,3"), ("1", "0")):  # the script's own lines, run
        out = subprocess.run(["bash", "-c", "\n".join(lines) + '\necho "$LLAMA_JAX_LOCAL_DEVICE_IDS"'],
                             env={**os.environ, "SLURM_GPUS_ON_NODE": gpus}, capture_output=True, text=True)
        assert out.stdout.strip() == ids, out.stderr
    out = subprocess.run([sys.executable, "-m", "llama_jax.main", f"--config={ROOT}/experiments/pretrain.py:tiny",
                          "--workdir=unused"], env={**env(), "LLAMA_JAX_DISTRIBUTED": "auto",
                                                    "LLAMA_JAX_LOCAL_DEVICE_IDS": "0,a"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == ("error: LLAMA_JAX_LOCAL_DEVICE_IDS='0,a': give device "
                                                          "numbers, e.g. 0,1,2,3"), out.stderr


def test_slurm_script_requeues_before_the_time_limit_even_if_the_save_hangs(tmp_path):
    """USR1 (two minutes before the limit): SIGTERM to the run's step, a wait for its save
    that ends when the run does, or after SAVE_WAIT_S if it hangs, then the requeue; srun
    gets the allocation's CPUs per task."""
    def run_case(name, srun, scancel, wait_s):
        case = tmp_path / name
        bin_dir, log = case / "bin", case / "calls"
        bin_dir.mkdir(parents=True)
        (case / "venv" / "bin").mkdir(parents=True)
        (case / "venv" / "bin" / "activate").write_text("")
        fakes = {"srun": f'echo "srun $* cpus=$SRUN_CPUS_PER_TASK" >> {log}; echo $$ > {case}/pid; {srun}',
                 "scancel": f'echo "scancel $*" >> {log}; {scancel}', "scontrol": f'echo "scontrol $*" >> {log}'}
        for fake, body in fakes.items():
            (bin_dir / fake).write_text(f"#!/bin/bash\n{body}\n")
            (bin_dir / fake).chmod(0o755)
        e = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(case / "venv"),
             "SLURM_SUBMIT_DIR": ROOT, "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_ID": "77",
             "SAVE_WAIT_S": str(wait_s)}
        out_file = open(case / "out", "w")  # not a pipe: a fake run left behind would hold it open
        proc = subprocess.Popen(["bash", f"{ROOT}/launch/gpu_slurm.sbatch", "--config=x.py", "--workdir=w"], env=e,
                                stdout=out_file, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for _ in range(100):  # until the run has started
            if (case / "pid").exists():
                break
            time.sleep(0.1)
        start = time.time()
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(timeout=30)
        finally:
            took = time.time() - start
            os.killpg(proc.pid, signal.SIGKILL)  # a fake run that ignored SIGTERM
        out = (case / "out").read_text()
        assert proc.returncode == 0 and "time limit near: saving a checkpoint, then requeueing" in out
        return log.read_text().splitlines(), took

    calls, took = run_case("hangs", 'trap "" TERM; sleep 60 & wait $!', "", 3)  # a save that never ends
    assert calls[0] == "srun --kill-on-bad-exit=1 python -m llama_jax.main --config=x.py --workdir=w cpus=32"
    assert calls[1:] == ["scancel --signal=TERM 77.0", "scontrol requeue 77"] and 2.5 < took < 15, (calls, took)
    calls, took = run_case("saves", "sleep 60 & wait $!", f'kill $(cat {tmp_path}/saves/pid)', 20)  # ends at once
    assert calls[-1] == "scontrol requeue 77" and took < 5, (calls, took)


def test_local_launcher_takes_its_processes_with_it(tmp_path):
    """SIGHUP (a closed terminal) reaches every process as SIGTERM; a launcher killed
    outright takes its processes with it, rather than leave them waiting on each other."""
    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('term', os.environ['JAX_PROCESS_ID'], flush=True), "
              "sys.exit(143)))\n"
              f"open(r'{tmp_path}/pid' + os.environ['JAX_PROCESS_ID'], 'w').write(str(os.getpid()))\n"
              "print('up', flush=True)\n"
              "time.sleep(60)\n")

    def start():
        for f in tmp_path.glob("pid*"):
            f.unlink()
        p = subprocess.Popen([sys.executable, f"{ROOT}/launch/local.py", "--num_processes=2", "--", "python", "-c",
                              script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(200):
            if len(list(tmp_path.glob("pid*"))) == 2:
                return p, [int(f.read_text()) for f in sorted(tmp_path.glob("pid*"))]
            time.sleep(0.05)
        raise AssertionError("the processes did not start")

    def gone(pid):
        try:
            os.kill(pid, 0)
            return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        except (ProcessLookupError, FileNotFoundError):
            return True

    launcher, pids = start()
    time.sleep(0.5)
    launcher.send_signal(signal.SIGHUP)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 143 and out.count("term") == 2, (out, err)
    launcher, pids = start()
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 10
    while not all(map(gone, pids)) and time.time() < deadline:
        time.sleep(0.1)
    assert all(map(gone, pids))
