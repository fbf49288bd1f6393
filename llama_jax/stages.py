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

import jax
import numpy as np

from llama_jax import distributed, objectives
from llama_jax.data import LM_FEATURES, chat, preference, pretrain, synthetic
from llama_jax.tokenizer import Tokenizer


class Stage:
    heads: tuple[str, ...] = ("lm",)
    rows_per_example = 1  # sequences the trained model reads per batch element (pairs: 2)
    uses_frozen = False  # whether the step takes a frozen copy of the params (a reference policy)

    def prepare(self, config, workdir: str) -> None:
        """Called first, with the workdir (e.g. to write the toy data sets into it)."""
        self.workdir = workdir

    def objective(self, config):
        return objectives.next_token

    def frozen_params(self, config, model, param_sh):
        """(params that are not trained, their shardings), or (None, None)."""
        return None, None

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        """Stage-specific held-out metrics beyond the objective's `ev` (perplexity, exact
        match, per-bucket accuracy)."""
        return {}

    def batch_spec(self, config) -> dict[str, tuple[int, ...]]:
        return {k: (config.batch_size, config.seq_len) for k in LM_FEATURES}

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

            def copy():
                if os.path.abspath(source) != os.path.abspath(dest):
                    shutil.copy(source, dest + ".tmp")
                    os.replace(dest + ".tmp", dest)

            distributed.lead_first("tokenizer copied", copy)
            return tok
        distributed.lead_first("tokenizer trained",
                               lambda: os.path.exists(dest) or self.train_tokenizer(config, dest))
        return Tokenizer(dest)

    def train_tokenizer(self, config, dest: str) -> Tokenizer:
        from llama_jax import tokenizer as tk

        docs = pretrain.open_documents(config.data.source)
        budget, size = 50_000_000, 0  # characters: plenty for a demo vocabulary
        print(f"training a {config.model.vocab_size}-piece tokenizer on {config.data.source} -> {dest}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            sample = os.path.join(d, "sample.txt")
            with open(sample, "w") as f:
                for i in range(len(docs)):
                    text = docs[i]
                    if not isinstance(text, str):
                        raise tk.TokenizerError(
                            f"{config.data.source}: pre-tokenized data needs --config.data.tokenizer")
                    f.write(text + "\n")
                    size += len(text)
                    if size > budget:
                        break
            tk.train([sample], config.model.vocab_size, os.path.join(d, "tokenizer.model"))
            shutil.copy(os.path.join(d, "tokenizer.model"), dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        return Tokenizer(dest)

    # -- parameters --------------------------------------------------------------------
    def initial_params(self, config, model, mesh, rules, param_sh):
        from llama_jax import sharding

        params, _ = sharding.init_params(model, jax.random.key(config.seed), mesh, rules)
        if config.init_from:
            params = merge_pretrained(params, load_init_params(config, model, param_sh))
        return params

    def after_training(self, config, workdir, model, params, tokenizer, progress) -> None:
        pass


def load_init_params(config, model, param_sh):
    """The params of `config.init_from`, as the checkpoint's own heads have them, on the
    shardings of the matching leaves of `model` (the trunk is shared by every head)."""
    from llama_jax import checkpoint, sharding
    from llama_jax.model import Llama

    _, meta = checkpoint.read_meta(config.init_from)
    source = Llama(model.config, tuple(meta.get("heads", ["lm"])))
    shapes = sharding.abstract_params(source)
    flat_sh = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}
    fallback = next(iter(flat_sh.values()))
    fallback = jax.sharding.NamedSharding(fallback.mesh, jax.sharding.PartitionSpec())

    def target(path, s):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_sh.get(jax.tree_util.keystr(path), fallback))

    return checkpoint.load_params(config.init_from, jax.tree_util.tree_map_with_path(target, shapes))


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


class PretrainStage(Stage):
    """Next-token loss on packed documents; held-out perplexity against a unigram
    baseline; prints a sample at the end."""

    def train_data(self, config, tokenizer):
        return pretrain.make_dataset(config.data.source, tokenizer, config.seq_len, self.local_batch(config),
                                     config.seed, prefetch=config.data.prefetch, vocab_size=config.model.vocab_size)

    def eval_data(self, config, tokenizer):
        if not config.data.eval_source:
            return None
        return pretrain.make_dataset(config.data.eval_source, tokenizer, config.seq_len, self.local_batch(config),
                                     config.seed, split="eval", prefetch=0, vocab_size=config.model.vocab_size)

    def unigram_baseline(self, config, tokenizer) -> float:
        """Cross-entropy (nats/token) on the held-out batches of a unigram model fitted
        (add-one smoothed) on training batches: what a model that ignores context gets."""
        counts = np.ones(config.model.vocab_size)
        train = pretrain.make_dataset(config.data.source, tokenizer, config.seq_len, self.local_batch(config),
                                      config.seed + 1, prefetch=0)
        for _, b in zip(range(64), train):
            counts += np.bincount(b["targets"][b["loss_mask"] > 0], minlength=len(counts))
        train.close()
        logp = np.log(counts / counts.sum())
        data = self.eval_data(config, tokenizer)
        total, n = 0.0, 0
        for _, b in zip(range(config.eval_steps), data):
            t = b["targets"][b["loss_mask"] > 0]
            total, n = total - logp[t].sum(), n + len(t)
        data.close()
        return total / max(n, 1)

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        return {"eval_perplexity": math.exp(min(ev["eval_loss"], 50.0))} if "eval_loss" in ev else {}

    def after_training(self, config, workdir, model, params, tokenizer, progress) -> None:
        if config.data.eval_source and jax.process_index() == 0:
            baseline = self.unigram_baseline(config, tokenizer)
            progress.message(f"unigram baseline on the held-out batches: {baseline:.4f} nats/token")
        if not config.sample.prompt:
            return
        from llama_jax.generate import generate

        prompt = tokenizer.encode(config.sample.prompt, bos=True)
        out = generate(model.config, params, [prompt], config.sample.max_new_tokens,
                       temperature=config.sample.temperature, top_p=config.sample.top_p, seed=config.seed)
        progress.message(f"sample:\n{config.sample.prompt}{tokenizer.decode(out.tokens[0])}")


def _synthetic(config, workdir: str, kind: str, split: str, n: int, **kwargs) -> str:
    """Writes (once) a deterministic toy data set into WORKDIR/data and returns its path.
    The eval split uses another seed and drops prompts that also occur in training."""
    path = os.path.join(workdir, "data", f"{kind}_{split}.jsonl")

    def write():
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        records = synthetic.generate(kind, n, config.seed + (0 if split == "train" else 1000), split=split, **kwargs)
        if split == "eval":
            seen = {json.dumps(r.get("messages", r.get("prompt"))[:-1] if kind == "chat" else r.get("prompt"))
                    for r in synthetic.generate(kind, config.data.synthetic_train, config.seed, **kwargs)}
            records = [r for r in records if json.dumps(r.get("messages", r.get("prompt"))[:-1] if kind == "chat"
                                                        else r.get("prompt")) not in seen]
        synthetic.write_jsonl(records, path + ".tmp")
        os.replace(path + ".tmp", path)

    distributed.lead_first(f"toy data {kind}_{split}", write)
    return path


class SFTStage(Stage):
    """Supervised fine-tuning in the Llama 2-Chat format: next-token loss on answer
    tokens only, dialogs packed. `data.source` is a JSONL glob of dialogs, or `synthetic`
    for the toy chat tasks; held-out exact match of greedy answers is reported."""

    def prepare(self, config, workdir: str) -> None:
        super().prepare(config, workdir)
        self.train_path, self.eval_path = config.data.source, config.data.eval_source
        if config.data.source == "synthetic":
            self.train_path = _synthetic(config, workdir, "chat", "train", config.data.synthetic_train)
            self.eval_path = _synthetic(config, workdir, "chat", "eval", config.data.synthetic_eval)

    def train_data(self, config, tokenizer):
        return chat.make_dataset(self.train_path, tokenizer, config.seq_len, self.local_batch(config), config.seed,
                                 pack=config.data.pack, last_turn_only=config.data.last_turn_only,
                                 prefetch=config.data.prefetch)

    def eval_data(self, config, tokenizer):
        if not self.eval_path:
            return None
        return chat.make_dataset(self.eval_path, tokenizer, config.seq_len, self.local_batch(config), config.seed,
                                 pack=config.data.pack, last_turn_only=config.data.last_turn_only, num_epochs=1,
                                 shuffle=False, prefetch=0)

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        if not self.eval_path or not config.eval_exact_match:
            return {}
        return {"eval_exact_match": exact_match(model.config, params, tokenizer, self.eval_path,
                                                config.eval_exact_match, config.eval_max_new_tokens, mesh, rules)}


def exact_match(cfg, params, tokenizer, path: str, limit: int, max_new_tokens: int, mesh=None, rules=None) -> float:
    """Fraction of held-out dialogs whose greedy answer to the last user turn equals the
    reference answer exactly (white space at the ends ignored)."""
    from llama_jax.data.chat import open_dialogs
    from llama_jax.generate import generate

    dialogs = open_dialogs(path)
    records = [dialogs.record(i) for i in range(min(limit, len(dialogs)))]
    prompts = [tokenizer.encode_dialog(r["messages"][:-1]) for r in records]
    hits = 0
    for start in range(0, len(records), 32):
        out = generate(cfg, params, prompts[start:start + 32], max_new_tokens, mesh=mesh, rules=rules)
        for rec, toks in zip(records[start:start + 32], out.tokens):
            answer = tokenizer.decode([t for t in toks if t != tokenizer.eos_id]).strip()
            hits += answer == rec["messages"][-1]["content"].strip()
    return hits / max(len(records), 1)


class PreferenceStage(Stage):
    """Shared by the reward models and DPO: preference-pair data (a JSONL mixture, or
    `synthetic`)."""

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
            mix = config.data.synthetic_mix
            self.train_path = _synthetic(config, workdir, "preference", "train", config.data.synthetic_train,
                                         unsafe_prob=mix)
            self.eval_path = _synthetic(config, workdir, "preference", "eval", config.data.synthetic_eval,
                                        unsafe_prob=mix)

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
                                       shuffle=False, prefetch=0)


class RewardModelStage(PreferenceStage):
    """Helpfulness or safety reward model: the trunk of a chat model with a scalar head,
    trained with the margin ranking loss (+ the auxiliary safety term for the safety
    model); evaluated per rating bucket (paper Table 8) and by unsafe recall."""

    heads = ("score",)

    def objective(self, config):
        return functools.partial(objectives.ranking, safety_weight=float(config.reward.safety_weight))

    def margin_table(self, config) -> str:
        return config.reward.margin

    def evaluate_extra(self, config, model, params, tokenizer, mesh, rules, ev: dict) -> dict:
        if not self.eval_path:
            return {}
        from llama_jax.evaluate import reward_accuracy

        res = reward_accuracy(model.config, params, tokenizer, self.eval_path)
        return {f"eval_{k}": v for k, v in res.items() if isinstance(v, float) and k != "accuracy"}


class DPOStage(PreferenceStage):
    """Direct Preference Optimization against a frozen copy of the initial policy
    (`init_from`, e.g. the SFT model)."""

    uses_frozen = True

    def objective(self, config):
        return functools.partial(objectives.dpo, beta=float(config.dpo.beta))

    def frozen_params(self, config, model, param_sh):
        from llama_jax.train import RunError

        if not config.init_from:
            raise RunError("stage dpo needs --config.init_from (the policy to start from and stay near)")
        from llama_jax.sharding import abstract_params

        frozen = merge_pretrained(abstract_params(model), load_init_params(config, model, param_sh))
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(frozen)):
            raise RunError(f"{config.init_from}: does not hold every parameter of the policy (see above)")
        return frozen, param_sh


STAGES = {"pretrain": PretrainStage, "sft": SFTStage, "reward_model": RewardModelStage, "dpo": DPOStage}
