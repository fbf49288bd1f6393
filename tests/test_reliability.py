"""Faults and bad input: a corrupt latest checkpoint, non-finite losses under both
policies, a full disk, an unwritable workdir, and 40 bad inputs across the command lines,
each one line naming the problem, with nothing already written damaged."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from procs import ROOT, command, env, losses


def tree_digest(path):
    """Hash of every file (name and content) under `path`."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    return len(lines) == 1 and "Traceback" not in stderr


# ----------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        for name in files:
            if os.sep + "d" in root:  # the array data files of the OCDBT store
                open(os.path.join(root, name), "wb").close()


def _remove_meta(step_dir):
    shutil.rmtree(os.path.join(step_dir, "meta"))


@pytest.mark.parametrize("damage", [_truncate_arrays, _remove_meta], ids=["truncated-arrays", "missing-meta"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_run, tokenizer_path, damage):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    damage(os.path.join(workdir, "checkpoints", "12"))
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}"), env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint 12 in" in out.stderr and "is unreadable" in out.stderr
    assert "falling back to checkpoint 9" in out.stderr and "resumed from step 9" in out.stdout
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "12"))  # set aside, not deleted
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["9", "12"]
    assert losses(workdir) == losses(ref_dir)  # steps 10-12 retrained exactly


def test_a_full_disk_is_one_error_at_the_save_and_never_a_checkpoint(tmp_path, tokenizer_path):
    def limit_file_size():  # files over 60 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    workdir = str(tmp_path / "run")
    # without the compilation cache, whose writes would hit the same limit (a warning from JAX)
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}", steps=6), env=env(cache=False),
                         capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert out.returncode == 1
    assert "saving checkpoint 3 failed" in out.stderr and "File too large" in out.stderr
    assert "the last complete checkpoint is none" in out.stderr and one_error_line(out.stderr)
    assert not any(d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints")))


# ----------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------


class _Poisoned:
    """A pipeline whose `at`-th batch has a NaN in its loss mask."""

    def __init__(self, inner, at):
        self.inner, self.at, self.n = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.n += 1
        if self.n == self.at:
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, 0] = np.nan
        return batch

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)

    def close(self):
        self.inner.close()


def _poisoned_run(tmp_path, tokenizer_path, policy):
    from llama_jax import stages, train

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import pretrain as experiment

    c = experiment.get_config("tiny")
    c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads, c.model.vocab_size = 48, 1, 4, 2, 512
    c.seq_len, c.batch_size, c.total_steps, c.log_every_steps, c.eval_every_steps = 32, 8, 5, 1, 0
    c.checkpoint_every_steps, c.checkpoint.async_save, c.sample.prompt = 100, False, ""
    c.data.source, c.data.eval_source, c.data.tokenizer, c.nonfinite_policy = "synthetic", "", tokenizer_path, policy

    class Stage(stages.PretrainStage):
        def train_data(self, config, tokenizer):
            return _Poisoned(super().train_data(config, tokenizer), at=3)

    workdir = str(tmp_path / policy)
    return train.run(c, workdir, Stage()), workdir


def test_nonfinite_stop_policy_names_the_step_and_keeps_the_last_checkpoint(tmp_path, tokenizer_path):
    from llama_jax.train import RunError

    with pytest.raises(RunError, match=r"non-finite loss or gradient at step 3 \(the batch of step 3; loss nan\); "
                                       r"the update was not applied"):
        _poisoned_run(tmp_path, tokenizer_path, "stop")


def test_nonfinite_skip_policy_skips_and_counts(tmp_path, tokenizer_path):
    final, workdir = _poisoned_run(tmp_path, tokenizer_path, "skip")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["nonfinite_steps"] for r in rows if "loss" in r] == [0, 0, 1, 1, 1]
    assert rows[2]["loss"] == "nan"  # metrics.jsonl stays strict JSON
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    assert final["nonfinite_steps"] == 1
    lrs = [r["learning_rate"] for r in rows if "loss" in r]  # step 3's update was skipped: step 4 applies its rate
    assert lrs[3] == lrs[2] and len({lrs[0], lrs[1], lrs[2], lrs[4]}) == 4


# ----------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, nothing damaged
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tokenizer_path):
    d = tmp_path_factory.mktemp("bad")
    dialog = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (d / "malformed.jsonl").write_text(json.dumps(dialog) + "\n{not json\n")
    (d / "role.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"},
                                                           {"role": "assistant", "content": "x"}]}) + "\n")
    (d / "tags.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a [INST] b"},
                                                           {"role": "assistant", "content": "x"}]}) + "\n")
    (d / "rating.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "p"}], "chosen": "a",
                                                "rejected": "b", "rating": "great"}) + "\n")
    (d / "pairs.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "p"}], "chosen": "a",
                                               "rejected": "b", "rating": "better"}) + "\n")
    (d / "not_a_model.model").write_text("this is not a SentencePiece model\n")
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]}
    (d / "long_prompt.jsonl").write_text(json.dumps(long_prompt) + "\n")
    (d / "misnamed.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "p"}], "chosen": "a",
                                                  "rejected": "b", "ratings": "better", "chosen_is_safe": True})
                                      + "\n")
    hf = d / "hf_rope"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 100, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    pickled = d / "hf_pickle"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf / "config.json").read_text().replace(
        ', "rope_scaling": {"type": "linear", "factor": 2.0}', ""))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    meta = d / "meta_gap"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 100,
                                                  "norm_eps": 1e-5, "multiple_of": 32}))
    for i in (0, 2):
        (meta / f"consolidated.{i:02d}.pth").write_bytes(b"")
    (d / "meta_noparams").mkdir()
    (d / "empty").mkdir()
    from helpers import random_params

    from llama_jax import checkpoint as ckpt
    from llama_jax.model import LlamaConfig

    small = LlamaConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512)  # procs.SMALL's model
    ckpt.save_params(str(d / "no_tokenizer"), random_params(small), {"model": small.to_dict(), "heads": ["lm"]})
    ckpt.save_params(str(d / "a_reward_model"), random_params(small, ("score",)),
                     {"model": small.to_dict(), "heads": ["score"]}, tokenizer_path=tokenizer_path)
    ckpt.save_params(str(d / "other_tokenizer"), random_params(small), {
        "model": small.to_dict(), "heads": ["lm"], "tokenizer": {"sha256": "f" * 64, "vocab_size": 512}})
    (d / "a_file").write_text("x")
    return d


# (id, extra main flags, needle). {d} is the bad-files dir, {tok} the tokenizer; a first
# flag without dashes names another experiment (its tiny config, with no init_from).
MAIN_CASES = [
    ("typo-field", ["--config.modle.n_layers=2"],
     "--config.modle.n_layers=2: the config has no field 'modle'; did you mean \"model\""),
    ("typo-nested-field", ["--config.optimizer.learning_rat=0.1"],
     "--config.optimizer.learning_rat=0.1: the config has no field 'learning_rat'"),
    ("zero-log-interval", ["--config.log_every_steps=0"], "config.log_every_steps must be a positive integer"),
    ("zero-checkpoint-interval", ["--config.checkpoint_every_steps=0"], "config.checkpoint_every_steps"),
    ("zero-steps", ["--config.total_steps=0"], "config.total_steps must be a positive integer, got 0"),
    ("url-workdir", ["--workdir=gs://bucket/run"], "--workdir gs://bucket/run: URLs are not read or written"),
    ("url-init-from", ["--config.init_from=gs://bucket/run"], "config.init_from gs://bucket/run: URLs are not"),
    ("wrong-type", ["--config.model.n_layers=two"], "two"),
    ("rules-not-pairs", ["--config.mesh.rules=1"], "sharding rule #0 1 must be (logical_name, mesh_axes)"),
    ("misspelt-rule", ["--config.mesh.rules=(('batch',('data','fsdp')),('length',None),('embd','fsdp'),"
                       "('heads','tensor'),('kv_heads','tensor'),('head_dim',None),('mlp','tensor'),"
                       "('vocab','tensor'),('layers',None),('norm',None))"],
     "sharding rule #2 names logical axis 'embd', which the model does not have (meant 'embed'?)"),
    ("indivisible-heads", ["--config.model.n_heads=5"], "dim=48 is not divisible by n_heads=5"),
    ("kv-heads", ["--config.model.n_kv_heads=3"], "n_kv_heads"),
    ("mesh-mismatch", ["--config.mesh.tensor=3"], "devices are not divisible by the fixed axes' product 3"),
    ("unknown-stage", ["--config.stage=pretrian"], "unknown stage 'pretrian'"),
    ("seq-len", ["--config.seq_len=100000"], "exceeds the model's max_seq_len 512 (config.model.max_seq_len)"),
    ("zero-batch", ["--config.batch_size=0"], "config.batch_size must be a positive integer, got 0"),
    ("keep-no-checkpoint", ["--config.checkpoint.max_to_keep=0"], "config.checkpoint.max_to_keep must be a positive"),
    ("unknown-schedule", ["--config.optimizer.schedule=linear"], "schedule must be 'cosine' or 'constant'"),
    ("negative-lr-fraction", ["--config.optimizer.final_lr_fraction=-1.0"], "the fraction in [0, 1]"),
    ("negative-clip", ["--config.optimizer.clip_norm=-1.0"], "config.optimizer.clip_norm -1.0 is negative"),
    ("nonfinite-policy", ["--config.nonfinite_policy=maybe"], "nonfinite_policy"),
    ("grad-accum", ["--config.grad_accum_steps=3"], "grad_accum_steps"),
    ("missing-tokenizer", ["--config.data.tokenizer=/nonexistent/tok.model"], "/nonexistent/tok.model"),
    ("not-a-tokenizer", ["--config.data.tokenizer={d}/not_a_model.model"], "not_a_model.model"),
    ("tokenizer-too-big", ["--config.data.tokenizer={tok}", "--config.model.vocab_size=256"], "256"),
    ("missing-source", ["--config.data.source=jsonl:/nonexistent/*.jsonl"], "/nonexistent/*.jsonl"),
    ("malformed-jsonl", ["sft", "--config.data.source={d}/malformed.jsonl",
                         "--config.data.tokenizer={tok}"], "malformed.jsonl:2"),
    ("unknown-role", ["sft", "--config.data.source={d}/role.jsonl", "--config.data.tokenizer={tok}"],
     "robot"),
    ("chat-tags", ["sft", "--config.data.source={d}/tags.jsonl", "--config.data.tokenizer={tok}"],
     "[INST]"),
    ("wrong-rating", ["reward_model", "--config.data.source={d}/rating.jsonl",
                      "--config.data.tokenizer={tok}"], "great"),
    ("missing-init-from", ["--config.init_from=/nonexistent/run"],
     "config.init_from: /nonexistent/run: no such directory"),
    ("dpo-without-init", ["dpo", "--config.data.source={d}/pairs.jsonl",
                          "--config.data.tokenizer={tok}"], "init_from"),
    ("workdir-is-a-file", ["--workdir={d}/a_file/run"], "not writable"),
    ("bad-held-out", ["--config.data.eval_source=jsonl:{d}/malformed.jsonl"],
     "malformed.jsonl:1: missing field 'text'"),
    ("init-from-without-tokenizer", ["sft", "--config.init_from={d}/no_tokenizer"],
     "no_tokenizer: has no tokenizer.model; set --config.data.tokenizer"),
    ("rm-path-missing", ["rejection_sampling", "--config.init_from={d}/no_tokenizer",
                         "--config.rlhf.safety_reward_model=/no/rm"],
     "config.rlhf.safety_reward_model: /no/rm: no such directory"),  # before the prompts are written (test below)
    ("ppo-from-a-reward-model", ["ppo", "--config.init_from={d}/a_reward_model"],
     "a_reward_model: has heads ['score'], not the 'lm' head stage 'ppo' goes on from"),
    ("meta-dir-as-init-from", ["--config.init_from={d}/meta_gap"],
     "meta_gap: a Meta model directory, not a llama_jax checkpoint; import it first: python -m llama_jax.convert"),
    ("tokenizer-not-init-froms", ["sft", "--config.init_from={d}/other_tokenizer", "--config.data.tokenizer={tok}"],
     "is not the tokenizer config.init_from {d}/other_tokenizer was trained with (sha256 ffffffffffff)"),
    ("sft-nothing-trained", ["sft", "--config.data.source={d}/long_prompt.jsonl", "--config.data.tokenizer={tok}"],
     "long_prompt.jsonl: no dialog has a trained token within seq_len=64: every answer starts after it (e.g. "),
    ("dpo-beta-zero", ["dpo", "--config.dpo.beta=0", "--config.data.tokenizer={tok}"],
     "config.dpo.beta 0.0 must be > 0"),
    ("negative-safety-weight", ["reward_model", "--config.reward.safety_weight=-1", "--config.data.tokenizer={tok}"],
     "config.reward.safety_weight -1.0 must be >= 0"),
    ("safety-rm-without-labels", ["reward_model", "--config.reward.safety_weight=1",
                                  "--config.data.source={d}/misnamed.jsonl", "--config.data.tokenizer={tok}"],
     "misnamed.jsonl has chosen_safe / rejected_safe, which the safety term learns from (fields not read: "
     "'chosen_is_safe' (at {d}/misnamed.jsonl:1; meant 'chosen_safe'?), 'ratings'"),
]


@pytest.mark.parametrize("case", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_bad_main_input_is_one_line(tmp_path, bad_files, tokenizer_path, case):
    _, extra, needle = case
    extra = [e.format(d=bad_files, tok=tokenizer_path) for e in extra]
    experiment = "pretrain.py:tiny"
    if not extra[0].startswith("-"):
        experiment, extra = f"{extra[0]}.py:tiny", ["--config.init_from=", "--config.data.eval_source=", *extra[1:]]
    out = subprocess.run(command(str(tmp_path / "run"), *extra, steps=2, experiment=experiment), env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert needle.format(d=bad_files) in out.stderr, out.stderr[-2000:]
    assert one_error_line(out.stderr), out.stderr[-2000:]
    assert "step 1/" not in out.stderr  # refused before training
    if case[0] == "rm-path-missing":  # no data made with the wrong path, which the rerun would refuse
        assert not os.path.exists(tmp_path / "run" / "data")


def test_an_experiment_path_relative_to_another_directory_is_one_line(tmp_path):
    """`--config=experiments/X.py` run from outside the checkout: with an override it was a
    60-line traceback from ml_collections; now one line, with the path it meant."""
    out = subprocess.run([sys.executable, "-m", "llama_jax.main", "--config=experiments/sft.py:tiny",
                          f"--workdir={tmp_path / 'run'}", "--config.total_steps=2"],
                         env={**env(), "PYTHONPATH": ROOT}, cwd=tmp_path,  # this checkout's package, from elsewhere
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and one_error_line(out.stderr), out.stderr[-2000:]
    assert "--config=experiments/sft.py:tiny: no such file experiments/sft.py (did you mean " in out.stderr
    assert not os.path.exists(tmp_path / "run")


def test_a_workdir_of_another_model_is_refused_and_left_untouched(tmp_path, reference_run, tokenizer_path):
    """Resuming a finished run's workdir with another model, another stage (other heads)
    or a typo is refused; its checkpoints, metrics and config stay byte-identical. Other
    numerics (mlp_backward, remat_policy) are the same model: that resume goes ahead."""
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)

    def written():  # every file of the workdir, names and contents (data/ too: a stage's made data lives there)
        return tree_digest(workdir)

    before = written()
    for experiment, extra, needle in (
            ("pretrain.py:tiny", ["--config.model.n_layers=3"], "of another model (fields ['n_layers'] differ)"),
            ("pretrain.py:tiny", ["--config.model.max_seq_len=1024"],  # the same weights: how to go on from them
             f"(for a longer context, a new --workdir with --config.init_from={workdir} and "
             "--config.model.max_seq_len=1024)"),
            ("reward_model.py:tiny", ["--config.init_from="],
             "holds checkpoints of stage 'pretrain', not 'reward_model'; use a new --workdir (with "),
            ("sft.py:tiny", ["--config.init_from="], "holds checkpoints of stage 'pretrain', not 'sft'"),
            ("pretrain.py:tiny", ["--config.config_that_does_not_exist=1"], "config_that_does_not_exist")):
        out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}", *extra,
                                     experiment=experiment), env=env(), capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and needle in out.stderr and one_error_line(out.stderr), out.stderr[-2000:]
    # fewer steps than the checkpoint holds: the eval it would add would be logged before rows already there
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}", steps=6), env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "latest checkpoint is step 12, past config.total_steps 6" in out.stderr
    assert written() == before
    # an export or an import as the workdir: one line saying so (it was "no readable checkpoint", after writing)
    export = str(tmp_path / "export")
    from llama_jax import checkpoint as ckpt

    ckpt.export_params(workdir, export)
    exported = tree_digest(export)
    out = subprocess.run(command(export, f"--config.data.tokenizer={tokenizer_path}"), env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"{export}: holds a params-only checkpoint (an import or an export), not a run; " \
        f"start from it with --config.init_from={export}" in out.stderr and one_error_line(out.stderr), out.stderr
    assert tree_digest(export) == exported
    # a Hugging Face download (or any directory of another program's files) as the workdir: the run would
    # overwrite its config.json; refused, with the import command for the HF one
    hf, other, meta = tmp_path / "hf", tmp_path / "other", tmp_path / "meta"
    for d, files in ((hf, {"config.json": '{"model_type": "llama"}', "model.safetensors": "x"}),
                     (other, {"config.json": '{"name": "mine"}'}),
                     (meta, {"params.json": '{"dim": 8}', "consolidated.00.pth": "x"})):
        d.mkdir()
        for name, text in files.items():
            (d / name).write_text(text)
        out = subprocess.run(command(str(d), f"--config.data.tokenizer={tokenizer_path}"), env=env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and one_error_line(out.stderr), out.stderr[-2000:]
        assert sorted(os.listdir(d)) == sorted(files) and all((d / f).read_text() == t for f, t in files.items())
        assert {hf: f"--workdir {hf}: a Hugging Face model directory, not a llama_jax checkpoint; import it first: "
                    f"python -m llama_jax.convert --from=hf --src={hf} --dst=DIR, then pass DIR as --config.init_from",
                meta: f"--workdir {meta}: a Meta model directory, not a llama_jax checkpoint; import it first",
                other: f"--workdir {other}: holds files of another program (config.json), not a llama_jax "
                "run's"}[d] in out.stderr, out.stderr[-2000:]
    # a checkpoints/ that cannot be written to is found before training (it was at the first save, an interval
    # of compute later)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("not a directory")
    out = subprocess.run(command(str(blocked), f"--config.data.tokenizer={tokenizer_path}"), env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"workdir {blocked} is not writable" in out.stderr, out.stderr[-2000:]
    assert "step 1" not in out.stderr and os.listdir(blocked) == ["checkpoints"]
    # init_from takes the checkpoint's architecture: a command line asking for another one is refused
    out = subprocess.run(command(str(tmp_path / "fine_tune"), f"--config.data.tokenizer={tokenizer_path}",
                                 f"--config.init_from={ref_dir}", "--config.model.n_layers=3",
                                 "--config.model.max_seq_len=96"), env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and one_error_line(out.stderr), out.stderr[-2000:]
    assert "--config.model.n_layers=3 (it has 2) cannot apply" in out.stderr, out.stderr[-2000:]
    # numerics alone (model.COMPUTE_ONLY_FIELDS) make no other model: the run resumes, and says so
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}",
                                 "--config.model.mlp_backward=manual", "--config.model.remat_policy=full",
                                 "--config.model.scan_layers=false", steps=13),
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mlp_backward 'auto' -> 'manual', remat_policy 'none' -> 'full', scan_layers True -> False" in \
        out.stderr, out.stderr[-2000:]  # scan_layers too: the layers are stored stacked either way
    # config.json records the settings of the latest start; the earlier ones are kept
    assert "resuming with changed settings: model.mlp_backward 'auto' -> 'manual', model.remat_policy 'none' -> " \
        "'full'" in out.stderr, out.stderr[-2000:]
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["mlp_backward"] == "manual"
    history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
    assert [h["until_step"] for h in history] == [12] and history[0]["config"]["model"]["mlp_backward"] == "auto"
    # a rerun of the finished run with other settings trains nothing, so its record stays what it ran
    recorded = open(os.path.join(workdir, "config.json")).read()
    out = subprocess.run(command(workdir, f"--config.data.tokenizer={tokenizer_path}", "--config.seed=5", steps=13),
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "resuming with changed settings" not in out.stderr, out.stderr[-2000:]
    assert open(os.path.join(workdir, "config.json")).read() == recorded
    assert len(open(os.path.join(workdir, "config_history.jsonl")).readlines()) == 1


def _cli(module):
    import importlib

    return importlib.import_module(module).main


# (id, module, argv, needle)
CLI_CASES = [
    ("convert-missing-src", "llama_jax.convert", ["--from=hf", "--src={d}/nope", "--dst={t}/out"], "nope"),
    ("convert-rope-scaling", "llama_jax.convert", ["--from=hf", "--src={d}/hf_rope", "--dst={t}/out"],
     "RoPE scaling"),
    ("convert-pickle", "llama_jax.convert", ["--from=hf", "--src={d}/hf_pickle", "--dst={t}/out"],
     "PyTorch pickles are not loaded"),
    ("convert-meta-gap", "llama_jax.convert", ["--from=meta", "--src={d}/meta_gap", "--dst={t}/out"],
     "not numbered 00..01"),
    ("convert-meta-no-params", "llama_jax.convert", ["--from=meta", "--src={d}/meta_noparams", "--dst={t}/out"],
     "meta_noparams"),
    ("convert-no-direction", "llama_jax.convert", ["--src=a", "--dst=b"], "--from"),
    ("generate-missing", "llama_jax.generate", ["--checkpoint={d}/nope", "--prompt=hi"], "nope"),
    ("generate-empty-run", "llama_jax.generate", ["--checkpoint={d}/empty", "--prompt=hi"], "no complete checkpoint"),
    ("chat-missing", "llama_jax.chat", ["--checkpoint={d}/nope"], "nope"),
    ("evaluate-missing", "llama_jax.evaluate", ["--checkpoint={d}/nope", "--task=perplexity", "--data=stdlib"],
     "nope"),
    ("evaluate-bad-task", "llama_jax.evaluate", ["--checkpoint=x", "--task=vibes", "--data=x"], "vibes"),
    ("tokenizer-missing-input", "llama_jax.tokenizer", ["train", "--input={d}/nope*.txt", "--vocab_size=300",
                                                        "--output={t}/t.model"], "nope"),
    ("tokenizer-not-a-model", "llama_jax.tokenizer", ["encode", "--model={d}/not_a_model.model", "--text=hi"],
     "not_a_model.model"),
    ("checkpoint-export-empty", "llama_jax.checkpoint", ["export", "--workdir={d}/empty", "--output={t}/o"],
     "no complete checkpoint"),
    ("checkpoint-info-missing", "llama_jax.checkpoint", ["info", "{d}/nope"], "nope"),
    ("prepare-missing-source", "llama_jax.data.prepare", ["--source=text:{d}/nope*.txt", "--tokenizer={tok}",
                                                         "--output={t}/shards"], "nope"),
    ("prepare-bad-tokenizer", "llama_jax.data.prepare", ["--source=stdlib", "--tokenizer={d}/not_a_model.model",
                                                        "--output={t}/shards"], "not_a_model.model"),
    ("synthetic-bad-kind", "llama_jax.data.synthetic", ["--kind=poems"], "poems"),
    ("summary-no-config", "llama_jax.summary", ["--hf={d}/empty"], "config.json"),
    ("compare-not-a-run", "llama_jax.compare", ["{d}/empty"], "no metrics.jsonl"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_one_line(tmp_path, bad_files, tokenizer_path, capsys, case):
    _, module, argv, needle = case
    argv = [a.format(d=bad_files, t=tmp_path, tok=tokenizer_path) for a in argv]
    try:
        code = _cli(module)(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert needle in err, err
    assert one_error_line(err), err
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")  # nothing half-written


def test_sweep_rejects_a_bad_spec():
    out = subprocess.run([sys.executable, f"{ROOT}/launch/sweep.py", "--config=x", "--workdir=y", "--sweep=lr"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "expected FIELD=V1,V2" in out.stderr and one_error_line(out.stderr)
    for flag in ("--workdir=other", "--config=experiments/sft.py:tiny", "-workdir=other"):  # would replace every
        # run's own (absl takes a single dash too)
        out = subprocess.run([sys.executable, f"{ROOT}/launch/sweep.py", "--config=x", "--workdir=y",
                              "--sweep=seed=1,2", "--", flag], capture_output=True, text=True, timeout=60)
        name = flag.lstrip("-").split("=")[0]
        assert out.returncode == 2 and f"{flag.split('=')[0]} after --: give --{name} before --" in out.stderr


# ----------------------------------------------------------------------------------
# Untrusted files
# ----------------------------------------------------------------------------------


def test_no_code_runs_from_checkpoint_files():
    """Meta .pth files are read only with torch.load(weights_only=True); nothing in the
    package unpickles (pickle, np.load(allow_pickle=True), torch.load without
    weights_only); the only server-like code binds nowhere."""
    import re

    sources = {}
    for root, _, files in os.walk(os.path.join(ROOT, "llama_jax")):
        for name in files:
            if name.endswith(".py"):
                sources[os.path.join(root, name)] = open(os.path.join(root, name)).read()
    text = "\n".join(sources.values())
    loads = [line for line in text.splitlines() if "torch.load(" in line and not line.strip().startswith(("#", "`"))]
    assert loads and all("weights_only=True" in line for line in loads), loads
    assert not re.search(r"^\s*import pickle|pickle\.loads?\(|allow_pickle\s*=\s*True|dill|joblib", text, re.M)
    assert not re.search(r"\.bind\(|HTTPServer|socketserver", text)


@pytest.mark.parametrize("args, words", [
    (["--chip=tpu9"], "--chip=tpu9: unknown; known: ["),
    (["--num_devices=0"], "--num_devices must be a positive integer"),
    (["--json=/nonexistent/x.json"], "--json=/nonexistent/x.json: its directory does not exist"),
    (["--config=/nonexistent/nope.py:7b"], "/nonexistent/nope.py"),
    (["--num_devices=8", "--config.batch_size=4"], "the micro-batch (config.batch_size 4 / config.grad_accum_steps 1)"),
    (["--num_devices=8", "--config.batch_size=16", "--config.grad_accum_steps=4"], "grad_accum_steps 4) must be"),
])
def test_aot_compile_bad_input_is_one_line(args, words):
    out = subprocess.run([sys.executable, f"{ROOT}/launch/aot_compile.py",
                          f"--config={ROOT}/experiments/pretrain.py:tiny", "--num_devices=1", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (1, 2) and words in out.stderr, out.stderr
    assert one_error_line(out.stderr), out.stderr


def test_a_workdir_is_used_by_one_run_at_a_time(tmp_path):
    """WORKDIR/.lock: a second process is refused while the first holds it; the kernel
    drops it when that process ends; the same process may take it again (a run after a
    run that raised)."""
    from llama_jax import workdir

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llama_jax import workdir; "
                               f"workdir.lock({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirBusy, match="another run is using this workdir"):
            workdir.lock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    workdir.lock(str(tmp_path))  # free once the holder is gone, however it ended
    workdir.lock(str(tmp_path))  # this process's own lock is retaken
    workdir.release(str(tmp_path))


def test_with_the_preemption_service_off_a_multi_process_run_goes_on(monkeypatch, capsys):
    """With JAX's preemption service off, its sync point raises: a multi-process run says
    once that SIGTERM will not save, then trains on without asking again (it raised at
    the first step before). One process: a SIGTERM handler of ours, restored at close."""
    from jax.experimental import multihost_utils

    from llama_jax import distributed

    calls = []

    def off(step):
        calls.append(step)
        raise RuntimeError("Preemption sync manager has not been initialized")

    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", off)
    monkeypatch.setattr(distributed, "say", lambda *a, **k: print(*a))
    p = distributed.Preemption()
    assert [p.reached(s) for s in range(1, 4)] == [False, False, False]
    assert calls == [1] and capsys.readouterr().out.count("preemption service is off") == 1
    p.close()

    monkeypatch.setattr(distributed, "is_multiprocess", lambda: False)
    before = signal.getsignal(signal.SIGTERM)
    p = distributed.Preemption()
    assert not p.reached(1) and p.previous is not None  # our handler is in place (else the kill would end pytest)
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.reached(2)
    p.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_aot_compile_of_ppo_names_what_it_does_not_count():
    """PPO holds a reference policy, reward models and a gathered sampling copy beside the
    step compiled here: the verdict is the step's alone and says so."""
    out = subprocess.run([sys.executable, f"{ROOT}/launch/aot_compile.py", f"--config={ROOT}/experiments/ppo.py:tiny",
                          "--num_devices=1", "--chip=h100"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "h100: 80 GiB per chip -> fits (keeping 10% headroom), the train step alone" in out.stdout
    assert "not counted: the reference policy and the reward models" in out.stdout
