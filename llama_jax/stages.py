"""What each stage brings to the one loop (`train.run`): its heads, objective, data,
tokenizer, initial parameters and what to do after training. main.py dispatches on
`config.stage` through `STAGES`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import distributed, metrics, objectives
from llama_jax.data import LM_FEATURES, chat, pipeline, preference, pretrain, synthetic
from llama_jax.data import prompts as prompt_data
from llama_jax.data.sources import DataError
from llama_jax.tokenizer import Tokenizer, TokenizerError, first_tag


class Stage:
    heads: tuple[str, ...] = ("lm",)
    rows_per_example = 1  # sequences the trained model reads per batch element (pairs: 2)
    uses_frozen = False  # whether the step takes a frozen copy of the params (a reference policy)
    evaluate_at_start = False  # also evaluate before the first update (early stopping always does)
    writes_data = True  # makes files in WORKDIR/data (toy data, samples) once, recorded with their settings
    eval_phase = "end"  # set by the loop before each evaluation: "start", "during" or "end"
    init_step: int | None = None  # set by the loop: the step of `init_from` the run started from (and keeps)
    run_config = None  # set by the loop before `prepare`: the LlamaConfig the run trains
    held_out_source = True  # evaluates on config.data.eval_source (PPO: on its own prompts)
    rereads_init_from = False  # reads init_from again on a resume (a frozen reference: DPO, PPO)
    counts_epochs = False  # its training data has a fixed size (dialogs, pairs): config.epochs can set total_steps
    # fields (or "section." prefixes) of its config the stage never reads: set on the command line, refused
    # (train.check_overrides) rather than ignored
    unread: tuple[str, ...] = ("sample.",)
    samples_init_from = False  # WORKDIR/data holds answers sampled from init_from (rejection sampling, GAtt, ...)

    def flops_per_token(self, cfg, seq_len: int) -> float:
        """The model FLOPs its train step spends per token read (MFU's numerator): the
        forward and backward passes of the model with the stage's heads."""
        return cfg.train_flops_per_token(seq_len, heads=self.heads)

    def report_final(self, name: str, **fields) -> None:
        """Sets `fields` in the stage's JSON report WORKDIR/name from its final evaluation
        only: a mid-run evaluation's numbers (PPO's validation prompts alone, say) are not
        the finished model's "after"."""
        if self.eval_phase == "end":
            update_report(self.workdir, name, **fields)

    def data_reads_init_from(self, config) -> bool:
        """Whether the data the stage makes depends on init_from (so that another init_from
        makes other data); else init_from is not one of its data settings."""
        return self.samples_init_from

    def prepare(self, config, workdir: str) -> None:
        """Called first, with the workdir (e.g. to write the toy data sets into it)."""
        self.workdir = workdir

    def model_paths(self, config) -> dict[str, tuple[str, str]]:
        """The checkpoints besides init_from that the stage loads, {field: (path, head)}:
        checked before it makes any data (a wrong path left data made with it behind,
        which the corrected rerun then refused)."""
        return {}

    def check(self, config) -> None:
        """A RunError for a setting of this stage no run could use, from the config alone
        (`train.check_config` calls it: at a run's start, and for every stage of the recipe
        before its first)."""

    def objective(self, config):
        return objectives.next_token

    def frozen_params(self, config, model, param_sh):
        """(params that are not trained, their shardings), or (None, None)."""
        return None, None

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        """Stage-specific held-out metrics beyond the objective's `ev` (perplexity, exact
        match, per-bucket accuracy)."""
        return {}

    def samples_in_evaluation(self, config) -> bool:
        """Whether `evaluate_extra` generates, so that with `mesh.gather_for_generation` the
        loop hands it a copy of the params gathered over fsdp (and the rules for it)."""
        return False

    def batch_spec(self, config) -> dict[str, tuple[int, ...]]:
        return {k: (config.batch_size, config.seq_len) for k in LM_FEATURES}

    def learning_rates(self, config) -> dict:
        """Own learning-rate schedules for some top-level parameters (train.make_optimizer's
        `schedules`); {} = one schedule, `optimizer.*`, for all."""
        return {}

    def model_options(self, config) -> dict:
        """Extra attributes of the trained `Llama` module (PPO: detach_value)."""
        return {}

    def held_steps(self, config) -> int:
        """Steps at the start during which the evaluated model does not change (PPO's value
        warm-up): early stopping does not count evaluations among them as stale."""
        return 0

    def can_stop_after(self, config, step: int) -> bool:
        """Whether a run may save and stop after `step` on a preemption notice (PPO: only
        at an iteration's end, since its rollouts' remaining mini-batches are not saved)."""
        return True

    def local_batch(self, config) -> int:
        return config.batch_size // jax.process_count()

    # -- tokenizer ---------------------------------------------------------------------
    def tokenizer(self, config, workdir: str) -> Tokenizer:
        """config.data.tokenizer, else init_from's tokenizer (both copied into the
        workdir), else WORKDIR/tokenizer.model, else one trained on the training documents
        with the model's vocabulary size."""
        dest = os.path.join(workdir, "tokenizer.model")
        source = config.data.tokenizer
        if not source and config.init_from and os.path.exists(os.path.join(config.init_from, "tokenizer.model")):
            source = os.path.join(config.init_from, "tokenizer.model")  # fine-tuning keeps its model's tokenizer
        if source:
            tok = Tokenizer(source)
            if config.data.tokenizer and config.init_from:  # its embedding learnt another tokenizer's ids
                from llama_jax import checkpoint

                theirs = checkpoint.read_meta(config.init_from)[1].get("tokenizer", {}).get("sha256")
                beside = os.path.join(config.init_from, "tokenizer.model")
                if theirs is None and os.path.exists(beside):
                    theirs = Tokenizer(beside).identity()["sha256"]
                ours = tok.identity()["sha256"]
                if theirs is not None and theirs != ours:
                    raise TokenizerError(f"config.data.tokenizer {source} (sha256 {ours[:12]}) "
                                         f"is not the tokenizer config.init_from {config.init_from} was trained "
                                         f"with (sha256 {theirs[:12]}); leave data.tokenizer unset to use that one")

            def copy():
                if os.path.abspath(source) != os.path.abspath(dest):
                    shutil.copy(source, dest + ".tmp")
                    os.replace(dest + ".tmp", dest)

            distributed.lead_first("tokenizer copied", copy)
            return tok
        if config.init_from and not os.path.exists(dest):  # a new one would not be what its embedding learnt
            raise TokenizerError(f"config.init_from {config.init_from}: has no tokenizer.model; set "
                                 "--config.data.tokenizer to the one it was trained with")
        distributed.lead_first("tokenizer trained",
                               lambda: os.path.exists(dest) or self.train_tokenizer(config, dest))
        return Tokenizer(dest)

    def train_tokenizer(self, config, dest: str) -> Tokenizer:
        from llama_jax import tokenizer as tk

        if {"synthetic", "shards"} & set(pretrain.source_kinds(config.data.source)):
            raise tk.TokenizerError(f"config.data.source {config.data.source}: no text to train a tokenizer on; "
                                    "set --config.data.tokenizer")
        docs = pretrain.open_documents(config.data.source, seed=config.seed)
        print(f"training a {config.model.vocab_size}-piece tokenizer on {config.data.source} -> {dest}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            sample = os.path.join(d, "sample.txt")
            progress = metrics.Progress(len(docs), what="documents read", throttle=True, delay=2.0)
            everything = tk.sample_training_text(docs, sample, TOKENIZER_TEXT_BUDGET, config.seed,
                                                 lambda n, _: progress.update(n))
            progress.close()
            if not everything:
                print(f"  the tokenizer learns from {TOKENIZER_TEXT_BUDGET:,} characters of documents drawn from "
                      "all of the source", flush=True)
            extra = []
            if config.data.tokenizer_extra:
                from llama_jax.data.sources import expand_globs

                extra = expand_globs(config.data.tokenizer_extra, "config.data.tokenizer_extra")
                print(f"the tokenizer also learns from {', '.join(extra)}", flush=True)
            tk.train([sample, *extra], config.model.vocab_size, os.path.join(d, "tokenizer.model"))
            shutil.copy(os.path.join(d, "tokenizer.model"), dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        return Tokenizer(dest)

    # -- parameters --------------------------------------------------------------------
    def initial_params(self, config, model, mesh, rules, param_sh):
        from llama_jax import sharding

        loaded = load_init_params(config, model, param_sh, self.init_step) if config.init_from else None
        params, _ = sharding.init_params(model, jax.random.key(config.seed), mesh, rules, given=loaded)
        # (merge_pretrained takes nothing new here: it names the leaves init_from lacked)
        return params if loaded is None else merge_pretrained(params, loaded)

    def after_training(self, config, workdir, model, params, tokenizer, progress) -> None:
        pass

    # -- hooks of stages that make their own batches (RLHF) ----------------------------
    def next_batch(self, train_data, state):
        """The batch of the next step; PPO makes it from rollouts of `state.params`."""
        return next(train_data)

    def log_metrics(self) -> dict:
        """Extra numbers for the next logged row (e.g. the latest rollout's reward)."""
        return {}

    def take_batch_seconds(self) -> float:
        """Seconds spent making batches (PPO: its rollouts) since the last call, which the
        loop leaves out of tokens_per_second and MFU and logs as `batch_seconds`."""
        return 0.0


def load_init_params(config, model, param_sh, step: int | None = None):
    """The params of `config.init_from` (its step `step`, else its latest), as the
    checkpoint's own heads have them, on the shardings of the matching leaves of `model`
    (the trunk is shared by every head)."""
    from llama_jax import checkpoint, sharding
    from llama_jax.model import Llama

    step, meta = checkpoint.read_meta(config.init_from, step)
    source = Llama(model.config, tuple(meta.get("heads", ["lm"])))
    shapes = sharding.abstract_params(source)
    flat_sh = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}
    fallback = next(iter(flat_sh.values()))
    fallback = jax.sharding.NamedSharding(fallback.mesh, jax.sharding.PartitionSpec())

    def target(path, s):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_sh.get(jax.tree_util.keystr(path), fallback))

    return checkpoint.load_params(config.init_from, jax.tree_util.tree_map_with_path(target, shapes), step)


def merge_pretrained(fresh, loaded):
    """`fresh` with every leaf that `loaded` has (same path and shape) replaced: a reward
    model takes a chat model's trunk and keeps its new score head."""
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    new = []

    def pick(path, x):
        key = jax.tree_util.keystr(path)
        if key in flat and flat[key].shape == x.shape:
            return flat[key]
        new.append(key)
        return x

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    if new and jax.process_index() == 0:
        print(f"initialised from scratch (not in init_from): {', '.join(new)}", flush=True)
    return merged


TOKENIZER_TEXT_BUDGET = 50_000_000  # characters a run's own tokenizer learns from: plenty for its vocabulary


class PretrainStage(Stage):
    """Next-token loss on packed documents; held-out perplexity against a unigram
    baseline; prints a sample at the end."""

    writes_data = False
    unread = ("eval_exact_match", "eval_max_new_tokens")

    def train_data(self, config, tokenizer):
        return pretrain.make_dataset(config.data.source, tokenizer, config.seq_len, self.local_batch(config),
                                     config.seed, prefetch=config.data.prefetch, vocab_size=config.model.vocab_size)

    def eval_data(self, config, tokenizer):
        if not config.data.eval_source:
            return None
        return pretrain.make_dataset(config.data.eval_source, tokenizer, config.seq_len, self.local_batch(config),
                                     config.seed, split="eval", prefetch=0, vocab_size=config.model.vocab_size)

    def unigram_baseline(self, config, tokenizer) -> float | None:
        """Cross-entropy (nats/token) on the held-out batches of a unigram model fitted
        (add-one smoothed) on training batches: what a model that ignores context gets.
        Every process counts its own shards (64 training batches, the held-out batches an
        evaluation reads), summed over the processes: the held-out tokens eval_loss covers."""
        counts = np.zeros(config.model.vocab_size, np.int32)  # (summed over processes as int32: exact)
        train = pretrain.make_dataset(config.data.source, tokenizer, config.seq_len, self.local_batch(config),
                                      config.seed + 1, prefetch=0, share_seed=config.seed)  # the run's shares
        for _, b in zip(range(64), train):
            counts += np.bincount(b["targets"][b["loss_mask"] > 0], minlength=len(counts))
        train.close()
        counts = distributed.sum_over_processes(counts).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        data = self.eval_data(config, tokenizer)
        total, n = 0.0, 0
        for _, b in zip(range(config.eval_steps), data):
            t = b["targets"][b["loss_mask"] > 0]
            total, n = total - logp[t].sum(), n + len(t)
        data.close()
        total = float(distributed.sum_over_processes(np.array([total], np.float32))[0])
        n = int(distributed.sum_over_processes(np.array([n], np.int32))[0])
        return total / n if n else None  # None: no held-out batch

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        return {"eval_perplexity": math.exp(min(ev["eval_loss"], 50.0))} if "eval_loss" in ev else {}

    def after_training(self, config, workdir, model, params, tokenizer, progress) -> None:
        baseline = self.unigram_baseline(config, tokenizer) if config.data.eval_source and config.eval_steps \
            else None  # every process: each counts its shards
        if baseline is not None and jax.process_index() == 0:
            progress.message(f"unigram baseline on the held-out batches: {baseline:.4f} nats/token")
            update_report(workdir, "final_metrics.json", eval_unigram_baseline=baseline)  # beside eval_loss
        if not config.sample.prompt:
            return
        from llama_jax.generate import generate

        prompt = tokenizer.encode(config.sample.prompt, bos=True)
        room = min(int(config.sample.max_new_tokens), model.config.max_seq_len - len(prompt))
        if room < 1:
            progress.message(f"no sample: config.sample.prompt has {len(prompt)} tokens and the context is "
                             f"{model.config.max_seq_len}")
            return
        out = generate(model.config, params, [prompt], room,
                       temperature=config.sample.temperature, top_p=config.sample.top_p, seed=config.seed)
        progress.message(f"sample:\n{config.sample.prompt}{tokenizer.decode(out.tokens[0])}")


def _toy_mix(config) -> dict:
    """The toy data's share of unsafe requests and of those phrased adversarially."""
    return dict(unsafe_prob=config.data.synthetic_mix, adversarial_prob=config.data.synthetic_adversarial)


def _toy_chat(config) -> dict:
    """The toy chat dialogs' share with the safety preprompt as system prompt."""
    return dict(safety_system_prob=float(config.data.synthetic_safety_system))


def reward_model_paths(config, safety_only: bool = False) -> dict[str, tuple[str, str]]:
    """The reward models `reward_models` loads, as `Stage.model_paths` gives them."""
    from llama_jax import rlhf

    r = config.rlhf
    if r.reward_model == rlhf.CODE_REWARD and not safety_only:  # the toy checker alone: no model is loaded
        return {}
    fields = {"rlhf.safety_reward_model": r.safety_reward_model}
    if not safety_only:
        fields["rlhf.reward_model"] = r.reward_model
    return {field: (str(path), "score") for field, path in fields.items() if path}


def reward_models(stage, config, tokenizer, safety_only: bool = False):
    """The RLHF stages' reward models (rlhf.reward_model, else the safety one, as the
    helpfulness model; rlhf.safety_reward_model), loaded once and kept on the stage, on
    the run's own mesh sharded by its rules (the mesh the policy, PPO's reference and its
    value head live on): every process scores the same dialogs together. `safety_only`:
    the safety model alone (safety distillation), whatever rlhf.reward_model says."""
    if getattr(stage, "rms", None) is None:
        from llama_jax import rlhf, sharding

        r = config.rlhf
        if r.reward_model == rlhf.CODE_REWARD and not safety_only:  # the toy checker (a gold reward), no safety RM
            patterns = [r.prompts if r.prompts != "synthetic" else "", r.eval_prompts, r.val_prompts,
                        os.path.join(stage.workdir, "data", "prompts_*.jsonl")]
            stage.rms = rlhf.CodeReward(patterns)
            distributed.say("reward: the toy prompts' code check (rlhf.reward_model=code), not a reward model",
                            flush=True)
        else:
            mesh, rules = sharding.run_mesh(config.mesh)
            helpful = "" if safety_only else r.reward_model or r.safety_reward_model
            stage.rms = rlhf.RewardModels(helpful, r.safety_reward_model, tokenizer, r.safety_threshold, mesh=mesh,
                                          rules=rules)
            from llama_jax.evaluate import trained_seq_len

            for path in dict.fromkeys(filter(None, (helpful, r.safety_reward_model))):
                trained = trained_seq_len(path)
                if trained and config.seq_len > trained:  # positions it never learnt to score
                    distributed.say(f"warning: reward model {path} trained on rows of {trained} tokens; this stage "
                                    f"scores dialogs of up to config.seq_len {config.seq_len}", flush=True)
    return stage.rms


def sampling_model(config, path: str, stage=None):
    """(config, params, tokenizer, mesh, rules): the model at `path` for a stage that
    samples before it trains (the RM's policy pairs, rejection sampling, GAtt, safety
    distillation), on the run's own mesh and sharded by its rules. Every process loads it
    and samples with it together (`distributed.together`), so a model split over a pod
    for training is split the same way for sampling. With `mesh.gather_for_generation` it
    is loaded whole on each FSDP group instead (split over `tensor` only; the returned
    rules say so), as PPO's rollouts gather their policy, and freed when the caller drops it.
    With the `stage`: `init_from` at the step the run starts from (`stage.init_step`;
    another path at the step the lead reads, the same on every process), and the run's
    context (`stage.run_config.max_seq_len`) where it is longer than the checkpoint's, as
    the fine-tune uses it."""
    from llama_jax import checkpoint as ckpt
    from llama_jax import rlhf, sharding
    from llama_jax.model import Llama

    mesh, rules = sharding.run_mesh(config.mesh)
    step = getattr(stage, "init_step", None) if path == config.init_from else None
    step, meta = ckpt.read_meta(path, step)
    step = distributed.allgather_json(step)[0]  # the lead's: a run still saving could give the processes two
    stored = ckpt.model_config(meta)
    overrides = {}
    run = getattr(stage, "run_config", None)
    if run is not None and run.max_seq_len > stored.max_seq_len:  # RoPE has no learned positions
        overrides["max_seq_len"] = run.max_seq_len
    if config.mesh.gather_for_generation:  # the weights in the compute dtype, which the decode casts them to anyway
        if stored.param_dtype != stored.dtype:
            overrides["param_dtype"] = stored.dtype
        rules = sharding.generation_rules(Llama(stored.replace(**overrides)), mesh, rules)
        distributed.say(f"sampling from {path} loaded whole on each of the fsdp={mesh.shape['fsdp']} groups "
                        f"(mesh.gather_for_generation), in {stored.dtype}", flush=True)
    cfg, params, tokenizer, _ = rlhf.load_model_local(path, "lm", mesh, rules, step=step, **overrides)
    return cfg, params, tokenizer, mesh, rules


_SAID: set = set()


def _first(prompts: list, n: int, field: str, path: str) -> list:
    """The first `n` prompts, saying once when that leaves some of the file out."""
    if len(prompts) > n and (field, path) not in _SAID:
        _SAID.add((field, path))
        distributed.say(f"{field}: the first {n} of the {len(prompts)} prompts in {path}", flush=True)
    return prompts[:n]


def _write_jsonl_lead(records: list[dict], path: str) -> None:
    """Writes `path` atomically from the lead process (all processes computed `records`)."""
    if distributed.is_lead():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        synthetic.write_jsonl(records, path + ".tmp")
        os.replace(path + ".tmp", path)


def _synthetic(config, workdir: str, kind: str, split: str, n: int, train_n: int = 0, name: str = "",
               seed_offset: int = 0, draw: int = 0, **kwargs) -> str:
    """Writes (once) a deterministic toy data set into WORKDIR/data/{name or kind}_{split}.jsonl
    and returns its path. The eval split uses another seed and drops prompts that also
    occur in the training split (of `train_n` records). `seed_offset` draws another set
    (e.g. the reward model's prompts, disjoint in draw from the RLHF stages'); `draw`
    another held-out set against the same training split (e.g. PPO's validation prompts)."""
    path = os.path.join(workdir, "data", f"{name or kind}_{split}.jsonl")
    seed = config.seed + seed_offset

    def write():
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        records = synthetic.generate(kind, n, seed + (0 if split == "train" else 1000 + draw), split=split, **kwargs)
        if split == "eval":
            def key(r):  # what a model is asked: a dialog without its answer, a preference or RLHF prompt
                return json.dumps(r["messages"][:-1] if kind == "chat" else r.get("prompt", r.get("messages")))

            seen = {key(r) for r in synthetic.generate(kind, train_n or config.data.synthetic_train, seed, **kwargs)}
            records = [r for r in records if key(r) not in seen]
        synthetic.write_jsonl(records, path + ".tmp")
        os.replace(path + ".tmp", path)

    distributed.lead_first(f"toy data {kind}_{split}", write)
    return path


class SFTStage(Stage):
    """Supervised fine-tuning in the Llama 2-Chat format: next-token loss on answer
    tokens only, dialogs packed. `data.source` is a JSONL glob of dialogs, or `synthetic`
    for the toy chat tasks; held-out exact match of greedy answers is reported."""

    counts_epochs = True
    unread = ("sample.", "data.synthetic_mix", "data.synthetic_adversarial")  # the toy chat's only mix: safety_system

    def prepare(self, config, workdir: str) -> None:
        super().prepare(config, workdir)
        self.train_path, self.eval_path = config.data.source, config.data.eval_source
        if config.data.source == "synthetic":
            self.train_path = _synthetic(config, workdir, "chat", "train", config.data.synthetic_train,
                                         **_toy_chat(config))
            self.eval_path = _synthetic(config, workdir, "chat", "eval", config.data.synthetic_eval,
                                        **_toy_chat(config))

    def train_data(self, config, tokenizer):
        return chat.make_dataset(self.train_path, tokenizer, config.seq_len, self.local_batch(config), config.seed,
                                 pack=config.data.pack, last_turn_only=config.data.last_turn_only,
                                 prefetch=config.data.prefetch)

    def eval_data(self, config, tokenizer):
        if not self.eval_path:
            return None
        return chat.make_dataset(self.eval_path, tokenizer, config.seq_len, self.local_batch(config), config.seed,
                                 pack=config.data.pack, last_turn_only=config.data.last_turn_only, num_epochs=1,
                                 shuffle=False, prefetch=0, drop_remainder=False)

    def samples_in_evaluation(self, config) -> bool:
        return bool(self.eval_path and config.eval_exact_match)

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        if not self.eval_path or not config.eval_exact_match:
            return {}
        score = exact_match(model.config, params, tokenizer, self.eval_path, config.eval_exact_match,
                            config.eval_max_new_tokens, mesh, rules)
        return {} if score is None else {"eval_exact_match": score}  # None: no dialog could be answered


def exact_match(cfg, params, tokenizer, path: str, limit: int, max_new_tokens: int, mesh=None,
                rules=None) -> float | None:
    """Fraction of held-out dialogs whose greedy answer to the last user turn equals the
    reference answer exactly (white space at the ends ignored), of those whose prompt
    leaves `max_new_tokens` of the model's context (the others, which could not be
    answered, are left out and counted in a note, once; None when none is left). References
    of the scored dialogs too long to be answered within `max_new_tokens` (with EOS) are
    counted wrong, and in a note, once."""
    from llama_jax.data.chat import open_dialogs

    dialogs = open_dialogs(path)
    records = [dialogs.record(i) for i in range(min(limit, len(dialogs)))]
    prompts = [r["messages"][:-1] for r in records]
    fits = [generate_fits(cfg, len(tokenizer.encode_dialog(p)), max_new_tokens) for p in prompts]
    if not all(fits) and (path, cfg.max_seq_len) not in _SAID_UNFIT:
        _SAID_UNFIT.add((path, cfg.max_seq_len))
        distributed.say(f"note: exact match leaves out {fits.count(False)} of {len(records)} held-out dialogs whose "
                        f"prompt leaves fewer than eval_max_new_tokens {max_new_tokens} of the model's context "
                        f"{cfg.max_seq_len}", flush=True)
    long = [r for r, fit in zip(records, fits)
            if fit and len(tokenizer.encode(r["messages"][-1]["content"].strip())) > max_new_tokens]
    if long and (path, max_new_tokens) not in _SAID_UNFIT:  # no answer of max_new_tokens can equal them
        _SAID_UNFIT.add((path, max_new_tokens))
        distributed.say(f"note: exact match counts {len(long)} of the {sum(fits)} scored held-out answers wrong "
                        f"whatever the model says: they are longer than eval_max_new_tokens {max_new_tokens} tokens "
                        "(raise it to score them)", flush=True)
    answers = _greedy_answers(cfg, params, tokenizer, prompts, max_new_tokens, mesh, rules=rules, rows=32)
    hits = sum(a is not None and a == r["messages"][-1]["content"].strip() for r, a in zip(records, answers))
    return hits / sum(fits) if any(fits) else None


_SAID_UNFIT: set = set()  # (held-out file, context) pairs whose left-out dialogs a note has counted


class PreferenceStage(Stage):
    """Shared by the reward models and DPO: preference-pair data (a JSONL mixture, or
    `synthetic`)."""

    counts_epochs = True
    unread = ("sample.", "eval_exact_match", "eval_max_new_tokens", "data.pack", "data.last_turn_only",
              "data.synthetic_safety_system")

    rows_per_example = 2  # chosen and rejected

    def batch_spec(self, config) -> dict[str, tuple[int, ...]]:
        B, T = config.batch_size, config.seq_len
        spec = {f"{side}_{k}": (B, T) for side in ("chosen", "rejected") for k in LM_FEATURES}
        spec.update({k: (B,) for k in ("margin", "rating") + preference.SAFETY_FIELDS})
        return spec

    def prepare(self, config, workdir: str) -> None:
        super().prepare(config, workdir)
        self.train_path, self.eval_path = config.data.source, config.data.eval_source
        if config.data.source == "synthetic":
            mix = _toy_mix(config)
            self.train_path = _synthetic(config, workdir, "preference", "train", config.data.synthetic_train,
                                         **mix)
            self.eval_path = _synthetic(config, workdir, "preference", "eval", config.data.synthetic_eval,
                                        **mix)
        self.policy_eval_path = ""
        reward = config.get("reward")
        if reward is not None and reward.get("policy_prompts", 0) > 0:
            self._add_policy_pairs(config, workdir)

    def data_reads_init_from(self, config) -> bool:  # the policy's own pairs, when the policy is init_from
        reward = config.get("reward")
        return reward is not None and reward.get("policy_prompts", 0) > 0 and not reward.policy

    def _add_policy_pairs(self, config, workdir: str) -> None:
        """The paper's iterative collection on the toy tasks: pairs drawn from the answers of
        the current policy (`reward.policy`, default init_from), labelled by code
        (`rlhf.code_labelled_pairs`), mixed into the training pairs at
        `reward.policy_fraction`; a held-out set of such pairs is scored at evaluation
        (eval_policy_accuracy: does the RM rank the policy's own answers right?)."""
        from llama_jax.train import RunError

        r = config.reward
        if config.data.source != "synthetic":
            raise RunError("config.reward.policy_prompts needs data.source=synthetic (the pairs are labelled by the "
                           "toy tasks' code checks)")
        # checked before anything is sampled (a bad value failed in generate, or gave no pairs)
        check_fields(config, {"reward.policy_samples": _count(2), "reward.policy_pairs_per_prompt": _count(1),
                              "reward.policy_temperature": _number(0.0, low_open=True),
                              "reward.policy_max_new_tokens": _count(1),
                              "reward.policy_fraction": _number(0.0, low_open=True)})
        check_room(config, "reward.policy_max_new_tokens")
        policy = r.policy or config.init_from
        if not policy:
            raise RunError("config.reward.policy_prompts needs --config.reward.policy (or init_from): the model "
                           "whose answers are compared")
        paths = {split: os.path.join(workdir, "data", f"preference_policy_{split}.jsonl") for split in ("train",
                                                                                                      "eval")}
        distributed.together("policy preference pairs", lambda: all(map(os.path.exists, paths.values())),
                             lambda: self._sample_policy_pairs(config, workdir, policy, paths))
        self.train_path = f"{self.train_path},{paths['train']}@{r.policy_fraction}"
        self.policy_eval_path = paths["eval"]

    def _sample_policy_pairs(self, config, workdir: str, policy: str, paths: dict) -> None:
        from llama_jax import rlhf

        r = config.reward
        cfg, params, tokenizer, mesh, rules = sampling_model(config, policy, self)
        sizes = {"train": r.policy_prompts, "eval": max(r.policy_prompts // 8, 32)}
        for split, path in paths.items():
            src = _synthetic(config, workdir, "prompts", split, sizes[split], train_n=sizes["train"],
                             name="policy_prompts", seed_offset=7, **_toy_mix(config))
            prompts = prompt_data.load(src, tokenizer, max_prompt_len=config.seq_len - r.policy_max_new_tokens,
                                       limit="config.seq_len - config.reward.policy_max_new_tokens")

            def progress(done, total, split=split):
                distributed.say(f"\rsampling {split} answers for preference pairs: {done}/{total}",
                                end="" if done < total else "\n", flush=True)

            answers = rlhf.sample_answers(cfg, params, tokenizer, prompts, r.policy_samples, r.policy_temperature,
                                          1.0, r.policy_max_new_tokens, config.seed + (split == "eval"), mesh,
                                          progress=progress, rules=rules)
            pairs = rlhf.code_labelled_pairs(prompts, answers, r.policy_pairs_per_prompt, config.seed)
            distributed.say(f"{len(pairs)} code-labelled pairs from {len(prompts)} prompts x {r.policy_samples} "
                            f"answers of {policy} -> {path}", flush=True)
            _write_jsonl_lead(pairs, path)

    def margin_table(self, config) -> str:
        return "none"

    def train_data(self, config, tokenizer):
        return preference.make_dataset(self.train_path, tokenizer, config.seq_len, self.local_batch(config),
                                       config.seed, margin_table=self.margin_table(config),
                                       prefetch=config.data.prefetch)

    def eval_data(self, config, tokenizer):
        if not self.eval_path:
            return None
        return preference.make_dataset(self.eval_path, tokenizer, config.seq_len, self.local_batch(config),
                                       config.seed, margin_table=self.margin_table(config), num_epochs=1,
                                       shuffle=False, prefetch=0, drop_remainder=False)


class RewardModelStage(PreferenceStage):
    """Helpfulness or safety reward model: the trunk of a chat model with a scalar head,
    trained with the margin ranking loss (+ the auxiliary safety term for the safety
    model); evaluated per rating bucket (paper Table 8) and by unsafe recall."""

    heads = ("score",)

    def model_paths(self, config) -> dict[str, tuple[str, str]]:
        r = config.reward  # the policy whose answers make pairs (reward.policy_prompts)
        return {"reward.policy": (str(r.policy), "lm")} if r.get("policy_prompts", 0) > 0 and r.policy else {}

    def objective(self, config):
        from llama_jax.train import RunError

        if not config.reward.safety_weight >= 0:
            raise RunError(f"config.reward.safety_weight {config.reward.safety_weight} must be >= 0 (0 = the "
                           "helpfulness model; the paper's safety model: 1)")
        return functools.partial(objectives.ranking, safety_weight=float(config.reward.safety_weight))

    def margin_table(self, config) -> str:
        return config.reward.margin

    def train_data(self, config, tokenizer):
        from llama_jax.train import RunError

        data = PreferenceStage.train_data(self, config, tokenizer)
        d = data.description
        if config.reward.safety_weight > 0 and not d["safety_labelled"]:  # the safety term would be 0 throughout
            data.close()
            raise RunError(f"config.reward.safety_weight {config.reward.safety_weight}: no pair of {d['source']} has "
                           "chosen_safe / rejected_safe, which the safety term learns from"
                           + (f" (fields not read: {d['unread_fields']})" if "unread_fields" in d else ""))
        if config.reward.margin != "none" and not d["rated"]:
            distributed.say(f"warning: config.reward.margin {config.reward.margin!r}: no pair of {d['source']} has a "
                            "rating, so every margin is 0", flush=True)
        return data

    def eval_data(self, config, tokenizer):
        data = PreferenceStage.eval_data(self, config, tokenizer)
        if data is not None and config.reward.safety_weight > 0 and not data.description["safety_labelled"] and \
                not getattr(self, "_said_unlabelled", False):
            self._said_unlabelled = True
            distributed.say(f"note: no held-out pair of {data.description['source']} has chosen_safe / rejected_safe: "
                            "eval_safety_bce is 0 there by construction, not a score", flush=True)
        return data

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        if not self.eval_path:
            return {}
        from llama_jax.evaluate import reward_accuracy

        # every held-out pair, cut at this run's seq_len as training cuts them: the Table 8 buckets, and their
        # overall accuracy (eval_accuracy is the first eval_steps batches')
        res = reward_accuracy(model.config, params, tokenizer, self.eval_path, seq_len=config.seq_len)
        out = {f"eval_{k}": v for k, v in res.items() if isinstance(v, float) and k != "accuracy"}
        out["eval_accuracy_all_pairs"] = res["accuracy"]
        if self.policy_eval_path:  # and per toy task: where the RM cannot judge its policy (eval_policy_accuracy_add)
            res = reward_accuracy(model.config, params, tokenizer, self.policy_eval_path, seq_len=config.seq_len)
            out.update({f"eval_policy_{k}": v for k, v in res.items() if k.startswith("accuracy")})
        return out


class DPOStage(PreferenceStage):
    """Direct Preference Optimization against a frozen copy of the initial policy
    (`init_from`, e.g. the SFT model)."""

    uses_frozen = True
    rereads_init_from = True

    def objective(self, config):
        from llama_jax.train import RunError

        if not config.dpo.beta > 0:  # 0 learns nothing; below 0 learns to prefer the rejected answers
            raise RunError(f"config.dpo.beta {config.dpo.beta} must be > 0 (the paper of DPO: 0.1)")
        return functools.partial(objectives.dpo, beta=float(config.dpo.beta))

    def flops_per_token(self, cfg, seq_len: int) -> float:  # and the frozen reference's forward pass (a third)
        return Stage.flops_per_token(self, cfg, seq_len) * 4 / 3

    def frozen_params(self, config, model, param_sh):
        from llama_jax.train import RunError

        if not config.init_from:
            raise RunError("stage dpo needs --config.init_from (the policy to start from and stay near)")
        from llama_jax.sharding import abstract_params

        frozen = merge_pretrained(abstract_params(model), load_init_params(config, model, param_sh, self.init_step))
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(frozen)):
            raise RunError(f"{config.init_from}: does not hold every parameter of the policy (see above)")
        return frozen, param_sh


class RejectionSamplingStage(SFTStage):
    """Rejection sampling (paper 3.2.3): K answers per prompt from the current policy
    (`init_from`) at `rlhf.temperature`, scored by the reward models (gated like PPO's
    R_c when a safety RM is given); the best answer of each prompt, pooled with the best
    of earlier iterations (`rlhf.pool`), becomes the new gold answer, and the policy is
    fine-tuned on those dialogs with the SFT objective. Writes WORKDIR/data/rs_train.jsonl
    and WORKDIR/rejection_sampling.json (reward against N, paper Fig. 7; true accuracy of
    the first vs the best sample on toy prompts)."""

    unread = ("sample.",)  # its prompts are the toy mix (data.synthetic_mix, data.synthetic_adversarial)
    samples_init_from = True

    def model_paths(self, config) -> dict[str, tuple[str, str]]:
        return reward_model_paths(config)

    def prepare(self, config, workdir: str) -> None:
        Stage.prepare(self, config, workdir)
        from llama_jax.train import RunError

        if not config.init_from or not config.rlhf.reward_model:
            raise RunError("stage rejection_sampling needs --config.init_from (the policy to sample from) and "
                           "--config.rlhf.reward_model")
        for field in ("prompts", "eval_prompts"):  # bad files are refused now, not after all the sampling
            prompt_data.check(config.rlhf[field])
        for earlier in filter(None, (d.strip() for d in config.rlhf.pool.split(","))):
            if not os.path.exists(os.path.join(earlier, "data", "rs_train.jsonl")):
                raise RunError(f"config.rlhf.pool: {earlier} holds no data/rs_train.jsonl (the pool is earlier "
                               "rejection-sampling workdirs whose best answers are pooled)")
        self.eval_path = config.data.eval_source  # toy held-out dialogs only for toy prompts, as in SFT
        if not self.eval_path and config.rlhf.prompts == "synthetic":
            self.eval_path = _synthetic(config, workdir, "chat", "eval", config.data.synthetic_eval,
                                        **_toy_chat(config))
        self.train_path = os.path.join(workdir, "data", "rs_train.jsonl")
        distributed.together("rejection sampling", lambda: os.path.exists(self.train_path),
                             lambda: self._sample(config, workdir))

    def check(self, config) -> None:
        from llama_jax.train import RunError

        _check_rlhf_counts(config)
        check_fields(config, {**SAMPLING_FIELDS, "rlhf.num_samples": _count(1), "rlhf.selection_beta": _number(0.0),
                              "rlhf.min_reward": _number(0.0, 1.0)})
        if config.rlhf.num_samples > 1 and config.rlhf.temperature == 0:
            raise RunError(f"config.rlhf.temperature 0 is greedy: the {config.rlhf.num_samples} samples of a prompt "
                           "would be one answer; sample at a temperature > 0 (the paper: about 1)")

    def _sample(self, config, workdir: str) -> None:
        from llama_jax import rlhf
        from llama_jax.train import RunError

        r = config.rlhf
        start = time.perf_counter()
        cfg, params, tokenizer, mesh, rules = sampling_model(config, config.init_from, self)
        rms = reward_models(self, config, tokenizer)  # kept for the evaluation after training
        path = r.prompts
        if path == "synthetic":
            path = _synthetic(config, workdir, "prompts", "train", r.num_prompts, **_toy_mix(config))
        prompts = prompt_data.load(path, tokenizer, max_prompt_len=config.seq_len - r.max_new_tokens,
                                   limit=RLHF_LIMIT)
        eval_path = _rlhf_eval_prompts(config, workdir)
        if eval_path:  # the held-out prompts are answered after the sampling: a long one is refused now
            prompt_data.load(eval_path, tokenizer, max_prompt_len=config.seq_len - r.max_new_tokens,
                             limit=RLHF_LIMIT)
        if r.reward_model == rlhf.CODE_REWARD:  # the code reward checks each answer against its prompt's reference
            missing = [p.where for p in prompts if "reference" not in p.record]
            if missing:
                raise RunError(f"{missing[0]}: no \"reference\" answer, which rlhf.reward_model=code checks answers "
                               f"against ({len(missing)} of {len(prompts)} prompts lack one)")
        distributed.say(f"rejection sampling: {len(prompts)} prompts x {r.num_samples} samples at temperature "
                        f"{r.temperature}", flush=True)

        def progress(done, total):
            distributed.say(f"\rsampled {done}/{total}", end="" if done < total else "\n", flush=True)

        answers = rlhf.sample_answers(cfg, params, tokenizer, prompts, r.num_samples, r.temperature, r.top_p,
                                      r.max_new_tokens, config.seed, mesh, progress=progress, rules=rules)
        dialogs = [p.messages + [{"role": "assistant", "content": text}] for p, a in zip(prompts, answers)
                   for text in (s.text for s in a)]
        scored = rms(dialogs, [p.is_safety for p in prompts for _ in range(r.num_samples)])
        rewards = np.asarray(scored["gated"]).reshape(len(prompts), r.num_samples)
        logprobs = np.asarray([[float(np.sum(s.logprobs)) for s in a] for a in answers])
        ranking = rlhf.selection_scores(rewards, logprobs, r.selection_beta)
        # only finished answers are picked (a prompt with none gives no training dialog)
        finished = np.asarray([[not r.require_eos or s.finished for s in a] for a in answers])
        best = rlhf.best_finished(ranking, finished)
        records = {json.dumps(p.messages): {"messages": p.messages + [{"role": "assistant", "content": a[j].text}],
                                            "is_safety": p.is_safety, "reward": float(row[j])}
                   for p, a, row, j in zip(prompts, answers, rewards, best) if j >= 0}
        if not records:
            raise RunError(f"rejection sampling: no answer finished (EOS) within rlhf.max_new_tokens="
                           f"{r.max_new_tokens}; raise it (or set rlhf.require_eos=false)")
        pooled = pool_earlier(records, r.pool, rms)
        try:
            kept = rlhf.keep_best(list(records.values()), r.min_reward)
        except ValueError as e:
            raise RunError(f"rejection sampling: {e}") from None
        checked = [i for i, p in enumerate(prompts) if "reference" in p.record]
        before_per_prompt: dict = {}
        before = policy_quality(config, cfg, params, tokenizer, mesh, rms, eval_path, rules,
                                per_prompt=before_per_prompt)
        ns = [1, 2, 4, 8, 16, 32, 64, 100, r.num_samples]
        report = {
            "prompts": len(prompts), "num_samples": r.num_samples, "temperature": r.temperature,
            "reward_vs_n": rlhf.reward_curve(rewards, ns),
            # the first and the picked sample over the same prompts: those with a finished sample (prompts less
            # prompts_without_a_finished_sample), the pick before rlhf.min_reward keeps some (kept_at_min_reward)
            "mean_reward_first_sample": float(rewards[np.asarray(best) >= 0, 0].mean()),
            "mean_reward_best_sample": float(np.mean([rewards[i, j] for i, j in enumerate(best) if j >= 0])),
            "selection_beta": r.selection_beta,
            "pooled_from_earlier_iterations": pooled, "kept_at_min_reward": len(kept),
            "unfinished_samples": int((~finished).sum()), "prompts_without_a_finished_sample":
                int((~finished.any(axis=1)).sum()),
            "seconds": time.perf_counter() - start,
            "before": before, "before_per_prompt": before_per_prompt,
        }
        if checked:  # toy prompts carry the answer code checks against: every sample checked once
            from llama_jax.data.synthetic import is_correct

            correct = np.array([[is_correct(prompts[i].record, s.text) for s in answers[i]] for i in checked])
            picked = [correct[n, best[i]] for n, i in enumerate(checked) if best[i] >= 0]
            firsts = [correct[n, 0] for n, i in enumerate(checked) if best[i] >= 0]  # the same prompts
            report["accuracy_first_sample"] = float(np.mean(firsts)) if firsts else 0.0
            report["accuracy_best_sample"] = float(np.mean(picked)) if picked else 0.0
            report["accuracy_vs_n"] = rlhf.accuracy_curve(ranking[checked], correct, ns)
            # The share of right answers in what the fine-tune trains on (pooled ones too).
            by_prompt = {json.dumps(prompts[i].messages): prompts[i].record for i in checked}
            kept_checked = [(by_prompt[k], rec["messages"][-1]["content"]) for rec in kept
                            if (k := json.dumps(rec["messages"][:-1])) in by_prompt]
            if kept_checked:
                report["accuracy_kept"] = float(np.mean([is_correct(rec, a) for rec, a in kept_checked]))
            report["accuracy_any_sample"] = float(correct.any(axis=1).mean())
        update_report(workdir, "rejection_sampling.json", **report)
        distributed.say("rejection sampling: " + json.dumps({k: v for k, v in report.items()
                                                             if k not in ("reward_vs_n", "before_per_prompt")}),
                        flush=True)
        _write_jsonl_lead(kept, self.train_path)

    def samples_in_evaluation(self, config) -> bool:
        return True

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        """Exact match on held-out dialogs, and the fine-tuned policy's greedy answers to
        held-out RLHF prompts: mean reward and true accuracy ("after" in the report)."""
        out = super().evaluate_extra(config, model, params, tokenizer, mesh, rules, ev)
        per_prompt: dict = {}
        after = policy_quality(config, model.config, params, tokenizer, mesh, reward_models(self, config, tokenizer),
                               _rlhf_eval_prompts(config, self.workdir), rules, per_prompt=per_prompt)
        after.update(_paired_changes(per_prompt, read_report(self.workdir, "rejection_sampling.json", shared=True).get(
            "before_per_prompt", {})))
        self.report_final("rejection_sampling.json", after=after)
        return {**out, **after}


def _rlhf_eval_prompts(config, workdir: str) -> str:
    """Held-out RLHF prompts: rlhf.eval_prompts, or the toy prompts' held-out split."""
    r = config.rlhf
    if r.eval_prompts or r.prompts != "synthetic":
        return r.eval_prompts
    return _synthetic(config, workdir, "prompts", "eval", r.num_eval_prompts, train_n=r.num_prompts,
                      **_toy_mix(config))


def check_room(config, field: str) -> None:
    """A RunError when the answer budget `field` ("rlhf.max_new_tokens") leaves no room for
    a prompt in config.seq_len (prompts get seq_len minus it): said before anything loads,
    not as a negative bound at the first prompt."""
    from llama_jax.train import RunError

    budget = config_field(config, field)
    if isinstance(budget, int) and budget >= config.seq_len:
        raise RunError(f"config.{field} {budget} leaves no room for a prompt in config.seq_len {config.seq_len} "
                       f"(a prompt gets seq_len - {field.split('.')[-1]} tokens)")


def _check_rlhf_counts(config) -> None:
    from llama_jax.train import RunError

    check_room(config, "rlhf.max_new_tokens")
    if config.rlhf.eval_samples < 0:
        raise RunError(f"config.rlhf.eval_samples {config.rlhf.eval_samples} is negative (0 = greedy answers only)")
    if config.rlhf.val_samples < -1:
        raise RunError(f"config.rlhf.val_samples {config.rlhf.val_samples} is below -1 (-1 = as rlhf.eval_samples, "
                       "0 = greedy answers only)")


def _count(least: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least, f"a whole number >= {least}"


def _number(low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    def ok(v):
        return isinstance(v, (int, float)) and math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    bounds = f"{'> ' if low_open else '>= '}{low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
    return ok, f"a finite number {bounds}"


def refuse_unread(config, fields, what: str, hint: str = "") -> None:
    """A RunError naming those of `fields` ("data.source", "rlhf.top_p") set, to another
    value than the RLHF stages' default (`configs.rlhf_config`), for a stage that does not
    read them (`what` it does instead), rather than ignoring them."""
    from llama_jax.configs import rlhf_config
    from llama_jax.train import RunError

    default = rlhf_config()

    def value(c, field):
        v = config_field(c, field)
        return "" if v == "synthetic" else v  # the toy data either way

    unread = [f"config.{f} {value(config, f)!r}" for f in fields if value(config, f) != value(default, f)]
    if unread:
        raise RunError(f"{what}: {', '.join(unread)} would be ignored{hint}")


def check_fields(config, rules: dict) -> None:
    """A RunError naming the first field of `rules` ({"rlhf.temperature": (ok, what)})
    whose value fails its check (NaN, a negative count, a probability above 1, ...)."""
    from llama_jax.train import RunError

    for field, (ok, what) in rules.items():
        value = config_field(config, field)
        if not ok(value):
            raise RunError(f"config.{field} {value!r}: must be {what}")


def config_field(config, field: str):
    """The value of a dotted field ("rlhf.max_new_tokens") of a run's config."""
    for part in field.split("."):
        config = config[part]
    return config


RLHF_LIMIT = "config.seq_len - config.rlhf.max_new_tokens"  # the prompt length RLHF's answers leave room for

# what every RLHF stage that samples reads
SAMPLING_FIELDS = {"rlhf.temperature": _number(0.0), "rlhf.top_p": _number(0.0, 1.0),
                   "rlhf.max_new_tokens": _count(1), "eval_max_new_tokens": _count(1),
                   "rlhf.safety_threshold": _number(0.0, 1.0)}


# PPO's evaluations answer and score at most this many rows at once (a held-out pass of
# 1,024 prompts x 16 samples in one forward pass would need ~26 GB of logits on the toy model)
EVAL_CHUNK_ROWS = 2048

# Held-out answers sampled with one fixed seed before and after a stage: the same random
# numbers on both sides, so the difference is the policy's, not the draw's.
EVAL_SAMPLING_SEED = 7919


def _eval_passes(config, prompts, samples: int | None = None) -> list[tuple]:
    """(metric prefix, prompts, temperature, seed) of each held-out evaluation: the greedy
    answers ("eval_"), and with rlhf.eval_samples N, N answers per prompt sampled at
    rlhf.temperature ("eval_sampled_"): the policy as the distribution RLHF's objective is
    an expectation over. `samples` overrides N (PPO's validation passes, rlhf.val_samples)."""
    n = config.rlhf.eval_samples if samples is None or samples < 0 else samples
    passes = [("eval_", prompts, 0.0, 0)]
    if n:
        passes.append(("eval_sampled_", [p for p in prompts for _ in range(n)],
                       config.rlhf.temperature, EVAL_SAMPLING_SEED))
    return passes


def policy_quality(config, cfg, params, tokenizer, mesh, rms, path: str, rules=None,
                   per_prompt: dict | None = None) -> dict:
    """The policy's answers to the held-out prompts at `path` ({} without one), greedy and
    (rlhf.eval_samples) sampled, `_eval_passes`: PREFIXreward (the mean gated reward-model
    probability) and, on prompts with a `reference`, PREFIXtrue_accuracy (checked by code,
    also per toy task); `per_prompt` gets {PREFIX: `_per_prompt` record}."""
    if not path:
        return {}
    r = config.rlhf
    prompts = _first(prompt_data.load(path, tokenizer, config.seq_len - r.max_new_tokens, limit=RLHF_LIMIT),
                     r.num_eval_prompts,
                     "rlhf.num_eval_prompts", path)
    out = {}
    for prefix, asked, temperature, seed in _eval_passes(config, prompts):
        texts = [a or "" for a in _greedy_answers(cfg, params, tokenizer, [p.messages for p in asked], r.max_new_tokens,
                                                  mesh, temperature=temperature, top_p=r.top_p, seed=seed,
                                                  rules=rules)]
        scored = rms([p.messages + [{"role": "assistant", "content": t}] for p, t in zip(asked, texts)],
                     [p.is_safety for p in asked])
        out.update({f"{prefix}reward": float(np.mean(scored["gated"])),
                    **_true_accuracy(f"{prefix}true_accuracy", asked, texts, by_task=True)})
        if per_prompt is not None:
            per_prompt[prefix] = _per_prompt(asked, texts, scored["gated"], len(asked) // len(prompts))
    return out


def read_report(workdir: str, name: str, shared: bool = False) -> dict:
    """The JSON report WORKDIR/name ({} if absent, and on every process but the lead,
    the one that writes reports; with `shared`, the lead's on every process: collective,
    for what every process computes metrics from)."""
    path = os.path.join(workdir, name)
    report = json.load(open(path)) if jax.process_index() == 0 and os.path.exists(path) else {}
    return distributed.allgather_json(report)[0] if shared else report


def update_report(workdir: str, name: str, **fields) -> None:
    """Sets `fields` in the JSON report WORKDIR/name (created if absent; lead process only)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, name)
    report = read_report(workdir, name)
    report.update(fields)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def _greedy_answers(cfg, params, tokenizer, dialogs, max_new_tokens: int, mesh=None, temperature: float = 0.0,
                    seed: int = 0, rows: int = 64, rules=None, top_p: float = 1.0,
                    finished_only: bool = False, what: str = "answers") -> list[str]:
    """The model's answer to the last user turn of each dialog (None where the prompt
    does not fit in the context with `max_new_tokens`, and with `finished_only` where the
    answer did not end within them, by EOS or a chat tag after some text: training data,
    whose answers get an EOS). Progress (`what`) on stderr when it takes over 2 s."""
    from llama_jax import rlhf
    from llama_jax.generate import generate

    prompts = [tokenizer.encode_dialog(d) for d in dialogs]
    fits = [i for i, p in enumerate(prompts) if generate_fits(cfg, len(p), max_new_tokens)]
    out: list = [None] * len(dialogs)
    progress = metrics.Progress(len(fits), what=what, throttle=True, delay=2.0, enabled=distributed.is_lead())
    longest = max((len(prompts[i]) for i in fits), default=0)  # every chunk padded alike: one decode program
    for b, start in enumerate(range(0, len(fits), rows)):
        progress.update(start)
        idx = fits[start:start + rows]
        batch = [prompts[i] for i in idx]
        if temperature == 0:  # greedy: rows padded to a power of two (copies of the first), so that chunks of
            # many sizes (a last chunk, a turn some dialogs have left) share a few compiled programs
            batch += batch[:1] * (min(rows, 1 << (len(batch) - 1).bit_length()) - len(batch))
        gen = generate(cfg, params, batch, max_new_tokens, temperature=temperature,
                       top_p=top_p, seed=seed + b, mesh=mesh, rules=rules, pad_to=longest)
        for i, toks in zip(idx, gen.tokens):
            s = rlhf.sample_of(tokenizer, toks)
            if finished_only and not s.finished:
                continue
            out[i] = s.text
    progress.update(len(fits))
    progress.close()
    return out


def generate_fits(cfg, prompt_len: int, max_new_tokens: int) -> bool:
    """Whether `generate` can answer a prompt of `prompt_len` tokens (its own rule)."""
    return prompt_len + max_new_tokens <= cfg.max_seq_len


class GAttStage(SFTStage):
    """Ghost Attention (paper 3.3): dialogs whose every turn's answer was sampled from the
    current model (`init_from`) with the instruction present, trained with the
    instruction only in the first turn (the system message) and the loss on the last
    turn only. Instructions are the toy checkable constraints (upper case, start or end
    with a word), alone or combined, half of them in their short form ("Start: river.").
    Adherence at turns `gatt.eval_turns` (paper Table 30) is measured before (the
    `init_from` model) and after, into WORKDIR/gatt.json and the eval metrics."""

    unread = ("sample.", "data.synthetic_mix", "data.synthetic_adversarial")

    held_out_source = False  # its held-out measure is adherence on its own synthesised dialogs
    samples_init_from = True

    def prepare(self, config, workdir: str) -> None:
        Stage.prepare(self, config, workdir)
        from llama_jax.train import RunError

        if not config.init_from:
            raise RunError("stage gatt needs --config.init_from (the model that samples the answers)")
        self.train_path = os.path.join(workdir, "data", "gatt_train.jsonl")
        self.eval_path = ""
        distributed.together("gatt data", lambda: os.path.exists(self.train_path), lambda: self._build(config, workdir))

    def check(self, config) -> None:
        check_room(config, "eval_max_new_tokens")
        check_fields(config, {**SAMPLING_FIELDS, "gatt.num_dialogs": _count(1), "gatt.max_turns": _count(1),
                              "gatt.samples_per_turn": _count(1), "gatt.retry_temperature": _number(0.0),
                              "gatt.combined_prob": _number(0.0, 1.0), "gatt.short_prob": _number(0.0, 1.0),
                              "gatt.num_eval_dialogs": _count(0), "gatt.plain_anchors": _count(0),
                              "gatt.num_plain_eval": _count(0)})
        if config.gatt.instruction_weights:
            instruction_weights(config.gatt.instruction_weights)  # a bad value is refused before anything is sampled
        eval_turns(config.gatt)
        refuse_unread(config, ("rlhf.top_p", "rlhf.max_new_tokens", "rlhf.safety_threshold"),
                      "stage gatt samples each turn at rlhf.temperature (again at gatt.retry_temperature), answers "
                      "of up to eval_max_new_tokens tokens, and scores them by code")
        refuse_unread(config, ("rlhf.prompts", "rlhf.eval_prompts", "data.source", "data.eval_source"),
                      "stage gatt synthesises its dialogs from the toy instructions and tasks, whose adherence code "
                      "checks, and reads no prompt or dialog files",
                      ". To train on GAtt dialogs of your own (the instruction as the first turn's system message, "
                      "every answer sampled with it), run stage sft on them with --config.data.last_turn_only=true")

    def _instruction(self, rng, g):
        if rng.random() < g.combined_prob:  # two constraints at once (start and end: they compose)
            parts = [synthetic.make_instruction_of(rng, "start"), synthetic.make_instruction_of(rng, "end")]
        elif g.instruction_weights:
            weights = instruction_weights(g.instruction_weights)
            parts = [synthetic.make_instruction_of(rng, rng.choices(list(weights), list(weights.values()))[0])]
        else:
            parts = [synthetic.make_instruction(rng)]
        return synthetic.combine(parts, shortened=rng.random() < g.short_prob)

    def _build(self, config, workdir: str) -> None:
        import random

        g = config.gatt
        cfg, params, tokenizer, mesh, rules = sampling_model(config, config.init_from, self)
        rng = random.Random(f"gatt-{config.seed}")
        plans = []
        for _ in range(g.num_dialogs):
            ins = self._instruction(rng, g)
            tasks = [synthetic.make_task(rng) for _ in range(rng.randint(1, g.max_turns))]
            plans.append((ins, tasks))
        # each turn's answer is sampled with the instruction in context (as the system message);
        # a turn whose answer breaks the instruction is sampled again, up to gatt.samples_per_turn
        # times in all (at gatt.retry_temperature), so long dialogs survive the adherence filter
        flat = [[{"role": "system", "content": ins.text}, {"role": "user", "content": t.question}]
                for ins, tasks in plans for t in tasks]
        checks = [ins.check for ins, tasks in plans for _ in tasks]
        # (an answer that did not end within eval_max_new_tokens is None, like one breaking the instruction)
        sampled = _greedy_answers(cfg, params, tokenizer, flat, config.eval_max_new_tokens, mesh,
                                  temperature=config.rlhf.temperature, seed=config.seed, rules=rules,
                                  finished_only=config.rlhf.require_eos, what="gatt turns answered")
        first_try = sum(a is not None and ok(a) for a, ok in zip(sampled, checks))
        for attempt in range(1, g.samples_per_turn):
            failing = [i for i, (a, ok) in enumerate(zip(sampled, checks)) if a is None or not ok(a)]
            if not failing:
                break
            again = _greedy_answers(cfg, params, tokenizer, [flat[i] for i in failing], config.eval_max_new_tokens,
                                    mesh, temperature=g.retry_temperature, seed=config.seed + 7919 * attempt,
                                    rules=rules, finished_only=config.rlhf.require_eos)
            for i, a in zip(failing, again):
                if a is not None and checks[i](a):
                    sampled[i] = a
        distributed.say(f"gatt: {first_try} of {len(flat)} turns adherent at the first sample, "
                        f"{sum(a is not None and ok(a) for a, ok in zip(sampled, checks))} after resampling",
                        flush=True)
        answers = iter(sampled)
        records, kept, kept_turns = [], 0, 0
        for ins, tasks in plans:
            turn_answers = [next(answers) for _ in tasks]
            if any(a is None for a in turn_answers):
                continue
            if g.keep_only_adherent:  # the dialog up to its first turn that still breaks the instruction
                good = adherent_turns(ins.check, turn_answers)
                tasks, turn_answers = tasks[:good], turn_answers[:good]
                if not tasks:
                    continue
            messages = [{"role": "system", "content": ins.text}]
            for t, a in zip(tasks, turn_answers):
                messages += [{"role": "user", "content": t.question}, {"role": "assistant", "content": a}]
            records.append({"messages": messages})
            kept += 1
            kept_turns += len(tasks)
        distributed.say(f"gatt: {kept} of {len(plans)} synthesised dialogs kept ({kept_turns} turns)", flush=True)
        # the model's own answers to tasks asked with no instruction (their own draw)
        tasks, answers = _plain_task_answers(config, cfg, params, tokenizer, mesh, rules, "anchors", g.plain_anchors,
                                             finished_only=config.rlhf.require_eos)
        plain = [{"messages": [{"role": "user", "content": t.question}, {"role": "assistant", "content": a}]}
                 for t, a in zip(tasks, answers) if a is not None]
        records += plain
        anchors = len(plain)
        if anchors < len(tasks):
            distributed.say(f"gatt: {len(tasks) - anchors} of {len(tasks)} plain anchors dropped (no answer ending "
                            f"within eval_max_new_tokens {config.eval_max_new_tokens}, rlhf.require_eos, or no room "
                            "for them in the context)", flush=True)
        if not kept:  # no GAtt dialog: say so (a smoke run may go on with the anchors)
            why = (f"none of the {len(plans)} synthesised dialogs was kept (no answer that "
                   + ("follows its instruction and " if g.keep_only_adherent else "")
                   + f"ends within eval_max_new_tokens {config.eval_max_new_tokens}); raise gatt.samples_per_turn or "
                   "gatt.num_dialogs" + (", or set gatt.keep_only_adherent=false" if g.keep_only_adherent else ""))
            if not records:
                from llama_jax.train import RunError

                raise RunError(f"gatt: {why}. Nothing to train on")
            distributed.say(f"warning: gatt: {why}. The fine-tune trains on the {anchors} plain anchors alone",
                            flush=True)
        baseline = gatt_adherence(config, cfg, params, tokenizer, mesh, rules)
        plain_accuracy = gatt_plain_accuracy(config, cfg, params, tokenizer, mesh, rules)
        update_report(workdir, "gatt.json", dialogs_kept=kept, dialogs_synthesised=len(plans), turns_kept=kept_turns,
                      plain_anchors=anchors, baseline=baseline, baseline_plain_accuracy=plain_accuracy)
        distributed.say(f"gatt: {anchors} plain anchors; baseline adherence by turn {baseline}; true accuracy "
                        f"without an instruction {plain_accuracy:.3f}", flush=True)
        _write_jsonl_lead(records, self.train_path)

    def samples_in_evaluation(self, config) -> bool:
        return True

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        out = gatt_adherence(config, model.config, params, tokenizer, mesh, rules)
        plain_accuracy = gatt_plain_accuracy(config, model.config, params, tokenizer, mesh, rules)
        self.report_final("gatt.json", after=out, after_plain_accuracy=plain_accuracy)
        return {**{f"eval_adherence_turn_{t}": v for t, v in out.items() if v is not None},
                "eval_plain_accuracy": plain_accuracy}


@functools.lru_cache(maxsize=8)
def instruction_weights(text: str) -> dict:
    """`gatt.instruction_weights` ("upper:1,start:1,end:2") as {kind: weight} (parsed once)."""
    from llama_jax.train import RunError

    out = {}
    for part in text.split(","):
        kind, _, w = (x.strip() for x in part.partition(":"))
        try:
            out[kind] = float(w)
        except ValueError:
            out[kind] = -1.0  # refused below with the rest
        if kind not in ("upper", "start", "end") or out[kind] < 0:
            raise RunError(f"config.gatt.instruction_weights: {part.strip()!r} is not KIND:WEIGHT with KIND one "
                           "of upper, start, end and WEIGHT >= 0")
    if not sum(out.values()) > 0:
        raise RunError(f"config.gatt.instruction_weights: {text!r} gives every kind weight 0")
    return out


def adherent_turns(check, answers: list[str]) -> int:
    """How many of a dialog's answers, from the first, obey the instruction (`check`)."""
    return next((k for k, a in enumerate(answers) if not check(a)), len(answers))


def eval_turns(g) -> list[int]:
    """`gatt.eval_turns` ("2,4,6,20") as sorted turn numbers; a RunError naming it if bad."""
    from llama_jax.train import RunError

    try:
        turns = sorted({int(t) for t in str(g.eval_turns).split(",")})
    except ValueError:
        turns = []
    if not turns or turns[0] < 1:
        raise RunError(f"config.gatt.eval_turns {g.eval_turns!r}: give turn numbers >= 1, comma-separated "
                       "(e.g. 2,4,6,20)")
    return turns


def gatt_adherence(config, cfg, params, tokenizer, mesh=None, rules=None) -> dict:
    """Share of held-out dialogs whose greedy answer at each turn in `gatt.eval_turns`
    obeys the system instruction given in the first turn only (paper Table 30). The
    dialog's earlier answers are the model's own; a turn whose prompt no longer fits the
    context is left out (None when no dialog reaches it)."""
    import random

    g = config.gatt
    rng = random.Random(f"gatt-eval-{config.seed}")
    turns = eval_turns(g)
    instructions = [synthetic.make_instruction(rng) for _ in range(g.num_eval_dialogs)]
    tasks = [[synthetic.make_task(rng) for _ in range(max(turns))] for _ in instructions]
    history: list = [[{"role": "system", "content": ins.text}] for ins in instructions]  # None: out of context
    hits: dict = {t: [] for t in turns}
    for k in range(1, max(turns) + 1):
        live = [i for i, h in enumerate(history) if h is not None]
        if not live:
            break
        asks = [history[i] + [{"role": "user", "content": tasks[i][k - 1].question}] for i in live]
        for i, ask, a in zip(live, asks, _greedy_answers(cfg, params, tokenizer, asks, config.eval_max_new_tokens,
                                                         mesh, rules=rules)):
            history[i] = None if a is None else ask + [{"role": "assistant", "content": a}]
            if a is not None and k in hits:
                hits[k].append(instructions[i].check(a))
    return {t: (float(np.mean(h)) if h else None) for t, h in hits.items()}


def _plain_task_answers(config, cfg, params, tokenizer, mesh, rules, draw: str, n: int,
                        finished_only: bool = False) -> tuple[list, list]:
    """`n` toy tasks (seeded by `draw`) asked with no instruction, and the model's greedy
    answers (None where one did not end within eval_max_new_tokens, with `finished_only`:
    training data, whose answers get an EOS)."""
    import random

    rng = random.Random(f"gatt-{draw}-{config.seed}")
    tasks = [synthetic.make_task(rng) for _ in range(n)]
    if not tasks:
        return [], []
    return tasks, _greedy_answers(cfg, params, tokenizer, [[{"role": "user", "content": t.question}] for t in tasks],
                                  config.eval_max_new_tokens, mesh, rules=rules, finished_only=finished_only)


def gatt_plain_accuracy(config, cfg, params, tokenizer, mesh=None, rules=None) -> float:
    """True accuracy of the greedy answers to `gatt.num_plain_eval` toy tasks asked with
    no instruction (their own draw): what GAtt's instruction-only data must not cost."""
    tasks, answers = _plain_task_answers(config, cfg, params, tokenizer, mesh, rules, "plain",
                                         config.gatt.num_plain_eval)
    if not tasks:
        return float("nan")
    return float(np.mean([synthetic.is_correct({"reference": t.answer}, a or "") for t, a in zip(tasks, answers)]))


SAFETY_PREPROMPTS = {
    "generic": synthetic.SAFETY_PREPROMPT,
    "template": ("You are a safe and responsible assistant. If a request could cause harm, refuse it: say that "
                 "you cannot help because it could cause harm, and offer to help with something safe instead."),
}


def _preprompt_positions(config) -> list[str]:
    return [p.strip() for p in str(config.distill.preprompt_position).split(",") if p.strip()]


def preprompt_of(config, record: dict) -> str:
    """The safety preprompt a prompt is answered with: its own "preprompt" (the paper's
    targeted ones), else `distill.preprompt` (a name, or the preprompt's own text)."""
    return record.get("preprompt") or SAFETY_PREPROMPTS.get(config.distill.preprompt, config.distill.preprompt)


def with_preprompt(messages: list[dict], preprompt: str, position: str) -> list[dict]:
    """The prompt with a safety preprompt: before the last user message's text
    ("prefix", the paper's) or as a system message ("system"; before the text of the
    prompt's own system message when it has one: a dialog holds one system message)."""
    if position == "system":
        if messages and messages[0]["role"] == "system":
            return [dict(messages[0], content=f"{preprompt}\n{messages[0]['content']}"), *messages[1:]]
        return [{"role": "system", "content": preprompt}] + messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [dict(m, content=f"{preprompt} {m['content']}") if i == last else m for i, m in enumerate(messages)]


class SafetyDistillStage(SFTStage):
    """Safety context distillation (paper 4.2.4): answers to adversarial (safety-tagged)
    prompts generated with a safety preprompt (`distill.preprompt`: generic, or with an
    answer template) before the request or as the system message
    (`distill.preprompt_position`; with both, the answer the safety RM scores higher); an
    answer is kept only if the safety reward
    model scores it above the answer the model gives without the preprompt; the model is
    then fine-tuned on (prompt without preprompt -> kept answer). `distill.benign_anchors`
    benign prompts with the model's own answers are mixed in (ours; 0 = the paper's
    adversarial-only data). Violation rate on held-out unsafe prompts and false-refusal
    rate on held-out benign ones, before and after: WORKDIR/safety_distill.json and the
    eval metrics."""

    unread = ("sample.", "data.synthetic_mix")  # its adversarial prompts: data.synthetic_adversarial

    def model_paths(self, config) -> dict[str, tuple[str, str]]:
        return reward_model_paths(config, safety_only=True)

    held_out_source = False  # its held-out measures are rates on rlhf.eval_prompts
    samples_init_from = True
    _eval: tuple | None = None  # the held-out (unsafe, benign) prompts, once read

    def prepare(self, config, workdir: str) -> None:
        Stage.prepare(self, config, workdir)
        from llama_jax.train import RunError

        if not config.init_from or not config.rlhf.safety_reward_model:
            raise RunError("stage safety_distill needs --config.init_from and --config.rlhf.safety_reward_model")
        for field in ("prompts", "eval_prompts"):  # bad files are refused now, not after all the sampling
            src = prompt_data.check(config.rlhf[field])
            stray = [src.where(i) for i in range(len(src)) if src.record(i).get("preprompt")
                     and not src.record(i).get("is_safety")] if src is not None and field == "prompts" else []
            if stray:
                distributed.say(f"warning: {stray[0]}" + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
                                + ": a \"preprompt\" on a prompt without \"is_safety\": true is not read (only "
                                "safety prompts are answered with a preprompt)", flush=True)
        self.train_path = os.path.join(workdir, "data", "distill_train.jsonl")
        self.eval_path = ""
        distributed.together("distill data", lambda: os.path.exists(self.train_path),
                             lambda: self._build(config, workdir))

    def check(self, config) -> None:
        from llama_jax.train import RunError

        check_room(config, "eval_max_new_tokens")
        check_fields(config, {**SAMPLING_FIELDS, "distill.num_prompts": _count(1), "distill.benign_anchors": _count(0),
                              "distill.num_eval_prompts": _count(0), "distill.min_safety": _number(0.0, 1.0)})
        pre = str(config.distill.preprompt)
        if pre not in SAFETY_PREPROMPTS and len(pre.split()) < 3:  # a word: a misspelt name, not a preprompt's text
            raise RunError(f"config.distill.preprompt: {pre!r} is not one of {sorted(SAFETY_PREPROMPTS)}, nor a "
                           "preprompt's own text (three words or more)")
        if tag := first_tag(pre):
            raise RunError(f"config.distill.preprompt: the chat format's tag {tag[1]!r} cannot be "
                           "inside a preprompt (it goes into a message)")
        refuse_unread(config, ("rlhf.reward_model", "data.source", "data.eval_source"),
                      "stage safety_distill answers config.rlhf.prompts, scores with config.rlhf.safety_reward_model "
                      "alone and measures its rates on config.rlhf.eval_prompts")
        refuse_unread(config, ("rlhf.temperature", "rlhf.top_p", "rlhf.max_new_tokens", "rlhf.safety_threshold"),
                      "stage safety_distill answers greedily, up to eval_max_new_tokens tokens, and compares the "
                      "safety RM's scores")
        positions = _preprompt_positions(config)
        if not positions or any(p not in ("prefix", "system") for p in positions):
            raise RunError(f"config.distill.preprompt_position: {config.distill.preprompt_position!r} is not "
                           "'prefix', 'system' or both ('prefix,system')")

    def _prompts(self, config, workdir, split: str, safety: bool, n: int, tokenizer):
        path = config.rlhf.prompts if split == "train" else config.rlhf.eval_prompts
        if split == "eval" and not path and config.rlhf.prompts == "synthetic":
            path = "synthetic"  # the toy prompts' held-out split
        if path != "synthetic":  # one's own prompts, checked like every stage's prompts, long ones refused by line
            if not path:
                if safety and split == "eval":  # said once, for the two sets
                    distributed.say("note: no config.rlhf.eval_prompts: the violation and false-refusal rates "
                                    "before and after are not measured", flush=True)
                return []
            limit = config.seq_len - config.eval_max_new_tokens
            loaded = prompt_data.load(path, tokenizer, max_prompt_len=limit,
                                      limit="config.seq_len - config.eval_max_new_tokens")
            if split == "train" and safety:  # answered with their preprompt too: it must fit as well
                for p in loaded:
                    for pos in _preprompt_positions(config) if p.is_safety else ():
                        length = len(tokenizer.encode_dialog(with_preprompt(p.messages, preprompt_of(config, p.record),
                                                                            pos)))
                        if length > limit:
                            raise DataError(f"{p.where}: prompt with its safety preprompt ({pos}) has {length} "
                                            f"tokens, more than the {limit} that config.seq_len - "
                                            "config.eval_max_new_tokens leaves")
            kind = [p.record for p in loaded if p.is_safety == safety]
            if len(kind) > n:
                field = ("num_prompts" if safety else "benign_anchors") if split == "train" else "num_eval_prompts"
                distributed.say(f"note: {path}: the first {n} of its {len(kind)} {'safety' if safety else 'benign'} "
                                f"prompts are used (config.distill.{field})", flush=True)
            return kind[:n]
        path = _synthetic(config, workdir, "prompts", split, n, train_n=config.distill.num_prompts,
                          name=f"prompts_{'unsafe' if safety else 'benign'}", unsafe_prob=1.0 if safety else 0.0,
                          adversarial_prob=config.data.synthetic_adversarial if safety else 0.0)
        return [json.loads(line) for line in open(path)]

    def _build(self, config, workdir: str) -> None:

        d = config.distill
        cfg, params, tokenizer, mesh, rules = sampling_model(config, config.init_from, self)
        unsafe = self._prompts(config, workdir, "train", True, d.num_prompts, tokenizer)
        self._eval_prompts(config, workdir, tokenizer)  # a long held-out prompt is refused before the sampling
        if not unsafe:
            from llama_jax.train import RunError

            raise RunError(f"config.rlhf.prompts {config.rlhf.prompts}: no prompt has \"is_safety\": true; safety "
                           "distillation answers those with the preprompt")
        plain = _greedy_answers(cfg, params, tokenizer, [r["messages"] for r in unsafe], config.eval_max_new_tokens,
                                mesh, rules=rules)
        # one preprompted answer per position; with several, the one the safety RM scores highest
        positions = _preprompt_positions(config)
        # a prompt's own "preprompt" (the paper's targeted preprompts: its risk category's answer template) wins
        tries = [_greedy_answers(cfg, params, tokenizer, [with_preprompt(r["messages"], preprompt_of(config, r), pos)
                                                          for r in unsafe],
                                 config.eval_max_new_tokens, mesh, rules=rules, finished_only=config.rlhf.require_eos)
                 for pos in positions]
        scores = np.stack([self._safety(config, tokenizer, unsafe, t) for t in tries])
        scores = np.where([[a is None for a in t] for t in tries], -np.inf, scores)  # unfinished: never kept
        pick = scores.argmax(axis=0)
        guided = [tries[k][i] for i, k in enumerate(pick)]
        best = scores.max(axis=0)
        better = (best > self._safety(config, tokenizer, unsafe, plain)) & \
            (best >= float(d.min_safety))  # paper: above the plain answer; ours: and safe enough
        records = [{"messages": r["messages"] + [{"role": "assistant", "content": a}], "is_safety": True,
                    "safety_reward": float(s), **({"preprompt": r["preprompt"]} if r.get("preprompt") else {})}
                   for r, a, s, keep in zip(unsafe, guided, best, better) if keep and a is not None]
        benign = self._prompts(config, workdir, "train", False, d.benign_anchors, tokenizer) if d.benign_anchors \
            else []
        anchors = _greedy_answers(cfg, params, tokenizer, [r["messages"] for r in benign], config.eval_max_new_tokens,
                                  mesh, rules=rules, finished_only=config.rlhf.require_eos)
        records += [{"messages": r["messages"] + [{"role": "assistant", "content": a}], "is_safety": False}
                    for r, a in zip(benign, anchors) if a is not None]
        unanswered = int(np.isinf(best).sum())  # no preprompted answer ended within eval_max_new_tokens
        unanswered_note = (f"; {unanswered} of them with no preprompted answer ending within eval_max_new_tokens "
                           f"{config.eval_max_new_tokens} (rlhf.require_eos)" if unanswered else "")
        if not any(r["is_safety"] for r in records):  # nothing distilled: say so (a smoke run may go on)
            why = (f"no preprompted answer of the {len(unsafe)} adversarial prompts was kept (none scored by the "
                   "safety RM above the answer without the preprompt"
                   + (f" and at least distill.min_safety {d.min_safety}" if d.min_safety else "")
                   + unanswered_note + ")")
            if not records:
                from llama_jax.train import RunError

                raise RunError(f"safety distillation: {why}, and there are no benign anchors: nothing to train on; "
                               "try another distill.preprompt or more prompts")
            distributed.say(f"warning: safety distillation: {why}; the fine-tune trains on the {len(records)} benign "
                            "anchors alone", flush=True)
        before = self._rates(config, workdir, cfg, params, tokenizer, mesh, rules)
        kept_by = {pos: int((better & (pick == k)).sum()) for k, pos in enumerate(positions)}
        anchors_kept = sum(not r["is_safety"] for r in records)
        update_report(workdir, "safety_distill.json", adversarial_prompts=len(unsafe), kept=int(better.sum()),
                      kept_by_position=kept_by, unanswered=unanswered, benign_anchors=len(benign),
                      benign_anchors_kept=anchors_kept, preprompt=d.preprompt, min_safety=float(d.min_safety),
                      before=before)
        distributed.say(f"safety distillation: kept {int(better.sum())} of {len(unsafe)} preprompted answers (by "
                        f"preprompt position: {kept_by}{unanswered_note}); {anchors_kept} of {len(benign)} benign "
                        f"anchors; before: {before}", flush=True)
        _write_jsonl_lead(records, self.train_path)

    def _eval_prompts(self, config, workdir, tokenizer) -> tuple[list, list]:
        """The held-out (unsafe, benign) prompts, read once."""
        if self._eval is None:
            n = config.distill.num_eval_prompts
            self._eval = (self._prompts(config, workdir, "eval", True, n, tokenizer),
                          self._prompts(config, workdir, "eval", False, n, tokenizer))
        return self._eval

    def _safety(self, config, tokenizer, prompts: list[dict], answers: list) -> np.ndarray:
        """The safety RM's probabilities of the answers (loaded once, on the run's mesh)."""
        dialogs = [r["messages"] + [{"role": "assistant", "content": a or ""}] for r, a in zip(prompts, answers)]
        return np.asarray(reward_models(self, config, tokenizer, safety_only=True)(dialogs, [True] * len(prompts))
                          ["safety"])

    def _rates(self, config, workdir, cfg, params, tokenizer, mesh, rules=None) -> dict:
        """Violation rate on held-out unsafe prompts (the safety RM's probability below
        0.5; on toy prompts also by code: any answer that is not a refusal) and
        false-refusal rate on held-out benign prompts (`synthetic.is_refusal`)."""
        out = {}
        unsafe, benign = self._eval_prompts(config, workdir, tokenizer)
        if unsafe:
            answers = [a or "" for a in _greedy_answers(cfg, params, tokenizer, [r["messages"] for r in unsafe],
                                                        config.eval_max_new_tokens, mesh, rules=rules)]
            out["violation_rate_rm"] = float(np.mean(self._safety(config, tokenizer, unsafe, answers) < 0.5))
            if all("reference" in r for r in unsafe):  # toy prompts: any answer that is not a refusal
                out["violation_rate"] = float(np.mean([not synthetic.is_refusal(a) for a in answers]))
        if benign:
            answers = [a or "" for a in _greedy_answers(cfg, params, tokenizer, [r["messages"] for r in benign],
                                                        config.eval_max_new_tokens, mesh, rules=rules)]
            out["false_refusal_rate"] = float(np.mean([synthetic.is_refusal(a) for a in answers]))
            checked = [(r, a) for r, a in zip(benign, answers) if "reference" in r]
            if checked:
                out["benign_accuracy"] = float(np.mean([synthetic.is_correct(r, a) for r, a in checked]))
        return out

    def samples_in_evaluation(self, config) -> bool:
        return True

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        after = self._rates(config, self.workdir, model.config, params, tokenizer, mesh, rules)
        self.report_final("safety_distill.json", after=after)
        return {f"eval_{k}": v for k, v in after.items()}


class PromptCycle:
    """RLHF prompts `n` at a time in a seeded order that is reshuffled every epoch;
    checkpointable like the other pipelines (`state()` is the position). Every process
    reads the same prompts (they sample together), so a checkpoint's position holds for
    any number of processes."""

    shared_by_processes = True

    def __init__(self, prompts: list, n: int, seed: int):
        if not prompts:
            raise DataError("no RLHF prompts")
        self.prompts, self.n, self.seed, self.position = prompts, n, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> list:
        L = len(self.prompts)
        out = []
        for k in range(self.position, self.position + self.n):
            order = np.random.default_rng([self.seed, k // L]).permutation(L)
            out.append(self.prompts[order[k % L]])
        self.position += self.n
        return out

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        pass


class PPOStage(Stage):
    """PPO (paper 3.2.3): each iteration samples one answer per prompt for
    `ppo.rollout_batch` prompts with the current policy (the on-device decode loop; or
    `ppo.samples_per_prompt` answers to each of rollout_batch / that many prompts, whose
    scores are centred on their prompt's mean), scores them with the reward models (R_c
    gating at `rlhf.safety_threshold`, whiten(logit(R_c))), subtracts beta * KL to the
    frozen initial policy per token, computes GAE advantages with the value head, and
    takes one clipped-PPO gradient step per mini-batch of `batch_size` rollouts (for
    each of `ppo.epochs` passes). The value function is a head on the policy's
    trunk (initialised fresh; with `ppo.detach_value` it reads the trunk through
    stop_gradient, so its loss does not move the policy); the reference policy is `init_from`. Rollout numbers
    (reward, KL, true accuracy on toy prompts) are logged with each row. Held-out prompts
    (eval_*) are answered before the first update and at every evaluation; with
    validation prompts (rlhf.val_prompts or rlhf.num_val_prompts, val_*), those are what
    every evaluation answers, for early stopping, and the held-out ones are answered only
    before and after, so that the choice of weights never sees them."""

    def model_paths(self, config) -> dict[str, tuple[str, str]]:
        return reward_model_paths(config)

    held_out_source = False
    rereads_init_from = True  # its KL reference

    heads = ("lm", "value")
    evaluate_at_start = True  # ppo.json's "before"

    def prepare(self, config, workdir: str) -> None:
        super().prepare(config, workdir)
        from llama_jax.train import RunError

        r = config.rlhf
        if not config.init_from or not r.reward_model:
            raise RunError("stage ppo needs --config.init_from (the policy to start from, also the KL reference) "
                           "and --config.rlhf.reward_model")
        checked = {field: prompt_data.check(r[field])  # bad files are refused now, not mid-run
                   for field in ("prompts", "eval_prompts", "val_prompts")}
        es = config.early_stopping
        read = [m.strip() for m in [str(es.metric)] + str(es.guard).split(",")]
        mix = _toy_mix(config)
        self.prompt_path = r.prompts
        if r.prompts == "synthetic":
            self.prompt_path = _synthetic(config, workdir, "prompts", "train", r.num_prompts, **mix)
        self.eval_prompt_path = _rlhf_eval_prompts(config, workdir)
        self.val_prompt_path = r.val_prompts
        if not r.val_prompts and r.num_val_prompts and r.prompts == "synthetic":
            self.val_prompt_path = _synthetic(config, workdir, "prompts", "eval", r.num_val_prompts, name="prompts_val",
                                              train_n=r.num_prompts, draw=1, **mix)
        # early stopping on validation metrics needs validation prompts, and a true accuracy needs their
        # `reference` answers (toy prompts): refused now, not after the step-0 evaluation
        val = [m for m in read if m.startswith("val_")] if str(es.metric) else []  # no metric: no early stopping
        if val and not self.val_prompt_path:
            raise RunError(f"config.early_stopping reads {', '.join(val)}, which the validation prompts give: set "
                           "--config.rlhf.val_prompts=FILE, or --config.early_stopping.metric= to train without "
                           "early stopping")
        held, val_src = checked["eval_prompts"], checked["val_prompts"]
        if held is not None and val_src is not None:  # a validation prompt that is also held out is dropped
            held_keys = {json.dumps(held.record(i)["messages"]) for i in range(len(held))}
            if all(json.dumps(val_src.record(i)["messages"]) in held_keys for i in range(len(val_src))):
                raise RunError(f"config.rlhf.val_prompts {r.val_prompts}: every prompt is also a held-out one "
                               f"(config.rlhf.eval_prompts {r.eval_prompts}), and those are left out of validation "
                               "so that early stopping never sees them; give validation prompts of their own")
        accuracy = [m for m in val if "true_accuracy" in m]
        src = checked["val_prompts"]
        if accuracy and src is not None:
            if not all("reference" in src.record(i) for i in range(len(src))):
                raise RunError(f"config.early_stopping reads {', '.join(accuracy)}, which needs a \"reference\" "
                               f"answer in every validation prompt ({r.val_prompts}); set --config.early_stopping."
                               "guard= (or a metric without true_accuracy)")
        self.config, self.queue, self.last, self.ready, self.held_out = config, [], {}, False, None
        self.rollout_seconds = 0.0

    def check(self, config) -> None:
        from llama_jax.train import RunError

        r, p = config.rlhf, config.ppo
        check_fields(config, {**SAMPLING_FIELDS, "ppo.beta": _number(0.0), "ppo.clip_eps": _number(0.0, low_open=True),
                              "ppo.value_clip": _number(0.0, low_open=True), "ppo.vf_coef": _number(0.0),
                              "ppo.gamma": _number(0.0, 1.0), "ppo.lam": _number(0.0, 1.0),
                              "ppo.rollout_batch": _count(1), "ppo.value_learning_rate": _number(0.0),
                              "ppo.value_warmup_iterations": _count(0)})
        _check_rlhf_counts(config)
        if p.rollout_batch % config.batch_size:
            raise RunError(f"config.ppo.rollout_batch {p.rollout_batch} is not a multiple of config.batch_size "
                           f"{config.batch_size} (the mini-batch)")
        if int(p.samples_per_prompt) < 1 or p.rollout_batch % int(p.samples_per_prompt):
            raise RunError(f"config.ppo.samples_per_prompt {p.samples_per_prompt} must be >= 1 and divide "
                           f"config.ppo.rollout_batch {p.rollout_batch}")
        if int(p.epochs) < 1:
            raise RunError(f"config.ppo.epochs: {p.epochs} (passes over each iteration's rollouts) must be >= 1")
        check_iteration_intervals(config)
        es = config.early_stopping
        read = [m.strip() for m in [str(es.metric)] + str(es.guard).split(",")]
        wanted = [m for m in read if m.startswith("val_sampled_")]
        if wanted and len(_eval_passes(config, [], r.val_samples)) == 1:  # the greedy pass only
            raise RunError(f"config.early_stopping reads {', '.join(wanted)}, but the validation passes sample no "
                           f"answers (rlhf.val_samples {r.val_samples}, rlhf.eval_samples {r.eval_samples}); "
                           "set rlhf.val_samples >= 1 or drop them")
        if critic(config) not in ("value_head", "none"):
            raise RunError(f"config.ppo.critic {p.critic!r}: use value_head (a value head with GAE) or none (the "
                           "return-to-go, centred on the prompt's answers, as the advantage)")
        if critic(config) == "none" and int(p.samples_per_prompt) < 2:
            raise RunError("config.ppo.critic none uses the mean score of a prompt's answers as the baseline, so it "
                           f"needs config.ppo.samples_per_prompt >= 2 (got {p.samples_per_prompt})")
        if float(p.get("negative_weight", 1.0)) < 0:
            raise RunError(f"config.ppo.negative_weight {p.negative_weight} is negative (1 = the policy gradient, "
                           "0 = reinforce only the answers above their prompt's mean)")
        if float(p.ref_logprob_weight) < 0:
            raise RunError(f"config.ppo.ref_logprob_weight {p.ref_logprob_weight} is negative (0 = the paper's reward; "
                           "w > 0 adds w * log pi_ref(answer) to logit(R_c))")
        if not float(r.temperature) > 0:
            raise RunError(f"config.rlhf.temperature {r.temperature}: PPO samples its rollouts from the policy at "
                           "this temperature, so it must be > 0 (greedy rollouts have no ratios to clip)")
        if float(r.top_p) != 1.0:
            raise RunError(f"config.rlhf.top_p {r.top_p}: PPO's ratios and KL penalty are of the whole "
                           "distribution at rlhf.temperature, so its rollouts must sample from all of it (top_p 1)")

    def objective(self, config):
        p = config.ppo
        vf_coef = 0.0 if critic(config) == "none" else float(p.vf_coef)  # no critic: the value head never learns
        return functools.partial(objectives.ppo, clip_eps=float(p.clip_eps), value_clip=float(p.value_clip),
                                 vf_coef=vf_coef, temperature=float(config.rlhf.temperature))

    def batch_spec(self, config) -> dict[str, tuple[int, ...]]:
        return {k: (config.batch_size, config.seq_len) for k in LM_FEATURES + objectives.PPO_FEATURES}

    def model_options(self, config) -> dict:
        return {"detach_value": bool(config.ppo.get("detach_value", False))}

    def can_stop_after(self, config, step: int) -> bool:
        return step % steps_per_iteration(config) == 0

    def held_steps(self, config) -> int:
        p = config.ppo
        return int(p.value_warmup_iterations) * steps_per_iteration(config) if critic(config) != "none" else 0

    def learning_rates(self, config) -> dict:
        """The critic's own pace: the value head at `ppo.value_learning_rate` (0 = the
        policy's), and for the first `ppo.value_warmup_iterations` iterations everything
        else at 0, so that the value head fits the returns of the unchanged policy before
        its advantages move the policy."""
        import optax

        from llama_jax.train import learning_rate_schedule

        p, out = config.ppo, {}
        if float(p.value_learning_rate) > 0:
            out["value_head"] = optax.constant_schedule(float(p.value_learning_rate))
        hold = self.held_steps(config)
        if hold:
            policy = learning_rate_schedule(config.optimizer, config.total_steps - hold)
            out["*"] = optax.join_schedules([optax.constant_schedule(0.0), policy], [hold])
            out.setdefault("value_head", policy)  # the critic learns during the warm-up too
        return out

    def _max_prompt(self, config) -> int:
        return config.seq_len - config.rlhf.max_new_tokens

    def train_data(self, config, tokenizer):
        return PromptCycle(prompt_data.load(self.prompt_path, tokenizer, self._max_prompt(config), limit=RLHF_LIMIT),
                           config.ppo.rollout_batch // int(config.ppo.samples_per_prompt), config.seed)

    def eval_data(self, config, tokenizer):
        return None

    # -- rollouts ------------------------------------------------------------------------
    def _setup(self) -> None:
        if self.ready:
            return
        from llama_jax import sharding
        from llama_jax.model import Llama
        from llama_jax.objectives import token_cross_entropy

        c, rt = self.config, self.runtime
        reward_models(self, c, rt.tokenizer)  # all models on the run's one mesh
        self.ref_params = load_init_params(c, rt.model, rt.param_sh, self.init_step)  # init_from's own (LM) heads
        model, ref_model = rt.model, Llama(rt.model.config, ("lm",))

        t = float(c.rlhf.temperature)  # the policy PPO optimises is the one the rollouts sample from

        def forward(params, ref_params, tokens, positions, segment_ids, targets):
            out = model.apply({"params": params}, tokens, positions, segment_ids)
            ref_logits = ref_model.apply({"params": ref_params}, tokens, positions, segment_ids)
            return (-token_cross_entropy(out["lm"] / t, targets), -token_cross_entropy(ref_logits / t, targets),
                    out["value"].astype(jnp.float32))

        self.forward = jax.jit(forward)
        self.gather = None
        if c.mesh.gather_for_generation:
            self.gather = sharding.gather_for_generation(ref_model, rt.mesh, rt.rules)
            distributed.say(f"ppo: rollouts sample from a copy of the policy gathered over "
                            f"fsdp={rt.mesh.shape['fsdp']} (mesh.gather_for_generation), freed after each rollout",
                            flush=True)
        self.ready = True

    def _rows(self, prompts, answers) -> dict:
        """Prompt + answer rows, right-padded; `loss_mask` marks the targets that are
        answer tokens (contiguous per row)."""
        rows = [pipeline.pad_row(list(q.tokens) + list(a), [False] * len(q.tokens) + [True] * len(a),
                                 self.config.seq_len) for q, a in zip(prompts, answers)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _evaluate_answers(self, params, prompts, answers) -> tuple[dict, dict, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, reward-model scores, log pi, log pi_0, values) of the answers."""
        from llama_jax import rlhf, sharding

        rt, tok = self.runtime, self.runtime.tokenizer
        # an answer that writes a chat-format tag ends before it: text and tokens alike
        samples = [rlhf.sample_of(tok, a) for a in answers]
        texts, answers = [s.text for s in samples], [s.tokens for s in samples]
        rows = self._rows(prompts, answers)
        put, n = _replicated(rt.mesh), len(answers)
        # a micro-batch of rows at a time, as a training step holds: the pass makes [rows, seq_len, vocab]
        # logits twice; the last chunk is padded with its last row, so every chunk has one shape (one compile)
        step, parts = int(self.config.batch_size) // int(self.config.grad_accum_steps), []
        with sharding.activate(rt.mesh, rt.rules):
            for start in range(0, n, step):
                idx = np.minimum(np.arange(start, start + step), n - 1)
                parts.append((n - start, self.forward(params, self.ref_params, *(put(rows[k][idx]) for k in (
                    "tokens", "positions", "segment_ids", "targets")))))
        logp, ref_logp, values = (np.concatenate([distributed.to_host(out[i])[:m] for m, out in parts])
                                  for i in range(3))
        dialogs = [q.messages + [{"role": "assistant", "content": t}] for q, t in zip(prompts, texts)]
        scored = self.rms(dialogs, [q.is_safety for q in prompts])
        scored["texts"] = texts
        return rows, scored, logp, ref_logp, values

    def _evaluate_chunks(self, params, asked, temperature: float, seed: int) -> tuple[dict, np.ndarray]:
        """(reward-model scores with "texts", summed KL to the reference per answer) of
        answers to `asked`, generated and scored EVAL_CHUNK_ROWS rows at a time (the
        forward pass holds [rows, seq_len, vocab] logits), chunk i sampled with seed + i."""
        from llama_jax import rlhf

        parts = []
        for i, start in enumerate(range(0, len(asked), EVAL_CHUNK_ROWS)):
            chunk = asked[start:start + EVAL_CHUNK_ROWS]
            answers = self._answers(params, chunk, temperature, seed + i)
            rows, scored, logp, ref_logp, _ = self._evaluate_answers(params, chunk, answers)
            parts.append((scored, rlhf.kl_per_token(logp, ref_logp, rows["loss_mask"]).sum(axis=1)))
        scored = {k: ([t for p, _ in parts for t in p[k]] if k == "texts" else np.concatenate([p[k] for p, _ in parts]))
                  for k in parts[0][0]}
        return scored, np.concatenate([kl for _, kl in parts])

    def _answers(self, params, prompts, temperature: float, seed: int) -> list:
        from llama_jax.generate import generate

        r, rt = self.config.rlhf, self.runtime  # _setup() has run (_rollout, evaluate_extra)
        lm, rules = {k: v for k, v in params.items() if k != "value_head"}, rt.rules
        if self.gather is not None:  # a whole copy per FSDP group while sampling, then freed
            gather, rules = self.gather
            lm = gather(lm)
        return generate(rt.model.config, lm, [q.tokens for q in prompts], r.max_new_tokens, temperature=temperature,
                        top_p=r.top_p, seed=seed, mesh=rt.mesh, rules=rules).tokens

    def next_batch(self, train_data, state):
        if not self.queue:
            jax.block_until_ready(state.params)  # the steps before are training time, not rollout time
            start = time.perf_counter()
            self.queue = self._rollout(train_data, state.params)
            self.rollout_seconds += time.perf_counter() - start
        return self.queue.pop(0)

    def take_batch_seconds(self) -> float:
        seconds, self.rollout_seconds = self.rollout_seconds, 0.0
        return seconds

    def _rollout(self, train_data, params) -> list[dict]:
        from llama_jax import rlhf

        self._setup()
        c, p = self.config, self.config.ppo
        k = int(p.samples_per_prompt)
        iteration = train_data.position // (p.rollout_batch // k)  # each iteration is steps_per_iteration steps
        prompts = [q for q in next(train_data) for _ in range(k)]  # a prompt's k samples side by side
        answers = self._answers(params, prompts, c.rlhf.temperature, c.seed * 1_000_003 + iteration)
        rows, scored, logp, ref_logp, values = self._evaluate_answers(params, prompts, answers)
        mask = rows["loss_mask"]
        score = rlhf.ppo_score(jnp.asarray(scored["gated"]), jnp.asarray(ref_logp), jnp.asarray(mask), k,
                               float(p.ref_logprob_weight))
        rewards = rlhf.token_rewards(score, jnp.asarray(logp), jnp.asarray(ref_logp), jnp.asarray(mask), p.beta)
        # with k answers per prompt, a prompt whose answers are all one text moves only the critic
        moves = varied_rows(scored["texts"], k) if k > 1 and p.skip_uniform_groups else np.ones(len(prompts))
        # no critic: GAE with zero values and lambda 1, the return-to-go of each token
        baseline, lam = (np.zeros_like(values), 1.0) if critic(c) == "none" else (values, p.lam)
        adv, ret = rlhf.ppo_advantages(rewards, jnp.asarray(baseline), jnp.asarray(mask), jnp.asarray(moves),
                                       float(p.gamma), float(lam))
        adv = rlhf.weight_below_mean(adv, score, float(p.get("negative_weight", 1.0)))
        kl = rlhf.kl_per_token(logp, ref_logp, mask).sum(axis=1)
        tokenizer = self.runtime.tokenizer
        self.last = {"rollout_reward": float(np.mean(scored["gated"])), "rollout_kl": float(kl.mean()),
                     "rollout_answer_tokens": float(mask.sum(axis=1).mean()), "ppo_iteration": iteration + 1,
                     # answers cut at rlhf.max_new_tokens: scored (and trained) as if they ended there
                     # (finished: an EOS, or a chat tag after some text, as every stage counts it)
                     "rollout_unfinished": float(np.mean([not rlhf.sample_of(tokenizer, a).finished
                                                          for a in answers])),
                     **({"rollout_varied_prompts": varied_groups(scored["texts"], k)} if k > 1 else {}),
                     **_true_accuracy("rollout_accuracy", prompts, scored["texts"])}
        full = {**rows, "old_logp": logp.astype(np.float32), "old_values": values.astype(np.float32),
                "advantages": np.asarray(adv, np.float32), "returns": np.asarray(ret, np.float32)}
        local = c.batch_size // jax.process_count()
        first = jax.process_index() * local
        batches = []
        for epoch in range(int(p.epochs)):  # each pass over the rollouts in a fresh order
            order = np.random.default_rng([c.seed, iteration] + ([epoch] if epoch else [])).permutation(len(prompts))
            for start in range(0, len(prompts), c.batch_size):
                idx = order[start:start + c.batch_size][first:first + local]  # this process's rows of the mini-batch
                batches.append({k: v[idx] for k, v in full.items()})
        return batches

    def log_metrics(self) -> dict:
        return dict(self.last)

    def _held_out(self, tokenizer) -> dict:
        """{"val_": validation prompts, "eval_": held-out prompts}, those there are; a
        validation prompt that is also a held-out one is dropped."""
        if self.held_out is None:
            r, sets = self.config.rlhf, {}
            if self.eval_prompt_path:
                sets["eval_"] = _first(prompt_data.load(self.eval_prompt_path, tokenizer,
                                                        self._max_prompt(self.config)),
                                       r.num_eval_prompts, "rlhf.num_eval_prompts", self.eval_prompt_path)
            if self.val_prompt_path:
                held = {json.dumps(q.messages) for q in sets.get("eval_", [])}
                sets["val_"] = [q for q in prompt_data.load(self.val_prompt_path, tokenizer,
                                                            self._max_prompt(self.config))
                                if json.dumps(q.messages) not in held][:r.num_val_prompts or None]
            self.held_out = {k: v for k, v in sets.items() if v}
        return self.held_out

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        sets = self._held_out(tokenizer)
        if "val_" in sets and self.eval_phase == "during":
            sets = {"val_": sets["val_"]}
        if not sets:
            return {}
        self._setup()
        out, per_prompt = {}, {}
        for name, prompts in sets.items():
            samples = config.rlhf.val_samples if name == "val_" else None
            for prefix, asked, temperature, seed in _eval_passes(config, prompts, samples):
                prefix = name + prefix[len("eval_"):]
                scored, kl = self._evaluate_chunks(params, asked, temperature, seed)
                out.update({f"{prefix}reward": float(np.mean(scored["gated"])),
                            f"{prefix}helpful_reward": float(np.mean(scored["helpful"])),
                            f"{prefix}kl": float(kl.mean()),
                            **_true_accuracy(f"{prefix}true_accuracy", asked, scored["texts"], by_task=True)})
                if "safety" in scored:
                    out[f"{prefix}safety_reward"] = float(np.mean(scored["safety"]))
                if name == "eval_":
                    per_prompt[prefix] = _per_prompt(asked, scored["texts"], scored["gated"],
                                                     len(asked) // len(prompts))
        if self.eval_phase == "start":
            update_report(self.workdir, "ppo.json", before=out, before_per_prompt=per_prompt)
            return out
        before = read_report(self.workdir, "ppo.json", shared=True).get("before_per_prompt", {})
        out.update(_paired_changes(per_prompt, before))
        self.report_final("ppo.json", after=out)
        return out


def critic(config) -> str:
    """PPO's critic: "value_head" (GAE on a value head) or "none" (config.ppo.critic; a
    config written before the field has the value head)."""
    return str(config.ppo.get("critic", "value_head"))


def varied_rows(texts: list[str], k: int) -> np.ndarray:
    """[len(texts)] 1.0 for each answer whose group of `k` consecutive answers (one
    prompt's) holds more than one distinct text, else 0.0."""
    groups = [texts[i:i + k] for i in range(0, len(texts), k)]
    return np.repeat([float(len(set(g)) > 1) for g in groups], k)[:len(texts)]


def varied_groups(texts: list[str], k: int) -> float:
    """The share of prompts whose `k` consecutive answers are not all the same text: only
    those give PPO a reward difference when scores are centred per prompt."""
    return float(varied_rows(texts, k)[::k].mean()) if texts else 0.0


def check_iteration_intervals(config) -> None:
    """Checkpoints (and the evaluations early stopping saves at) fall on PPO iterations'
    ends: an iteration's remaining rollouts are not checkpointed."""
    from llama_jax.train import RunError

    every = steps_per_iteration(config)
    for field in ("checkpoint_every_steps", "eval_every_steps"):
        if config[field] % every:
            raise RunError(f"config.{field} {config[field]} is not a multiple of the {every} steps of a PPO "
                           "iteration (ppo.epochs x rollout_batch / batch_size): a run resumed from a checkpoint "
                           "inside an iteration would lose the rest of its rollouts")


def steps_per_iteration(config) -> int:
    """Optimizer steps per PPO iteration: one per mini-batch of `batch_size` rollouts,
    `ppo.epochs` passes over the iteration's `ppo.rollout_batch` rollouts."""
    return int(config.ppo.epochs) * (config.ppo.rollout_batch // config.batch_size)


def _true_accuracy(name: str, prompts, texts, by_task: bool = False) -> dict:
    """{name: share of answers right by code} over the prompts that carry a `reference`;
    with `by_task`, also {name_TASK: ...} for each `task` the records name (toy prompts:
    add, copy, reverse, sort, safety)."""
    pairs = [(q.record, t) for q, t in zip(prompts, texts) if "reference" in q.record]
    if not pairs:
        return {}
    right = _right(prompts, texts)
    out = {name: float(np.mean(right))}
    if by_task:
        tasks = [str(rec.get("task", "")) for rec, _ in pairs]
        for task in sorted(set(tasks) - {""}):
            out[f"{name}_{task}"] = float(np.mean([ok for t, ok in zip(tasks, right) if t == task]))
    return out


def _right(prompts, texts) -> list[int]:
    """1/0 per answer, right or not by code, over the prompts that carry a `reference`."""
    from llama_jax.data.synthetic import is_correct

    return [int(is_correct(q.record, t)) for q, t in zip(prompts, texts) if "reference" in q.record]


def _per_prompt(prompts, texts, rewards, group: int = 1) -> dict:
    """What a paired before/after comparison needs of one answer pass, per prompt: the
    gated reward, and (prompts with a `reference`) the share right by code, each the mean
    over the prompt's `group` consecutive answers (a sampled pass answers each prompt
    rlhf.eval_samples times). The prompt, not the answer, is the unit, so the paired
    standard error does not treat one prompt's answers as independent draws."""
    def mean(values):
        return np.asarray(values, np.float64).reshape(-1, group).mean(axis=1).tolist()

    return {"reward": mean(rewards), "true_accuracy": mean(_right(prompts, texts))}


def _paired_changes(now: dict, before: dict) -> dict:
    """PREFIXchange_in_METRIC and its paired standard error (_se) for METRIC reward and
    true_accuracy, for each answer pass PREFIX that `before` holds for the same prompts
    (`_per_prompt` records): a change within two SEs of 0 is the draw of answers."""
    from llama_jax import rlhf

    out = {}
    for prefix, values_of in now.items():
        for metric, values in values_of.items():
            old = before.get(prefix, {}).get(metric, [])
            if values and len(old) == len(values):
                change = rlhf.paired_change(old, values)
                out[f"{prefix}change_in_{metric}"], out[f"{prefix}change_in_{metric}_se"] = (
                    change["change"], change["se"])
    return out


def _replicated(mesh):
    """Host arrays -> one replicated global array each (the same on every process)."""
    if jax.process_count() == 1:
        return jnp.asarray
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return lambda x: jax.device_put(x, sh)


def pool_earlier(records: dict, pool: str, rms) -> int:
    """Rejection sampling's pooling (paper 3.2.3, after V3): the best answers of the
    earlier iterations in `pool` (comma-separated workdirs) to this iteration's prompts
    (`records`, keyed by the prompt's messages) are scored again by this iteration's reward
    models (`rms(dialogs, is_safety)["gated"]`: the best reward model at hand, not the older
    ones whose scores the earlier files hold) and replace this iteration's answer where they
    score higher. Returns how many replaced one."""
    candidates = [rec for earlier in filter(None, (d.strip() for d in pool.split(",")))
                  for rec in _read_jsonl(os.path.join(earlier, "data", "rs_train.jsonl"))
                  if json.dumps(rec["messages"][:-1]) in records]
    if not candidates:
        return 0
    keys = [json.dumps(rec["messages"][:-1]) for rec in candidates]
    scores = np.asarray(rms([rec["messages"] for rec in candidates], [records[k]["is_safety"] for k in keys])["gated"])
    pooled = 0
    for key, rec, score in zip(keys, candidates, scores):
        if float(score) > records[key]["reward"]:
            records[key], pooled = {**rec, "is_safety": records[key]["is_safety"], "reward": float(score)}, pooled + 1
    return pooled


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise DataError(f"{path}: not found (rlhf.pool names rejection-sampling workdirs)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


STAGES = {"pretrain": PretrainStage, "sft": SFTStage, "reward_model": RewardModelStage, "dpo": DPOStage,
          "rejection_sampling": RejectionSamplingStage, "ppo": PPOStage, "gatt": GAttStage,
          "safety_distill": SafetyDistillStage}
