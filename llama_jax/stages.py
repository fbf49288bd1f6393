"""What each stage brings to the one loop (`train.run`): its heads, objective, data,
tokenizer, initial parameters and what to do after training. main.py dispatches on
`config.stage` through `STAGES`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import jax
import numpy as np

from llama_jax import objectives
from llama_jax.data import LM_FEATURES, pretrain
from llama_jax.tokenizer import Tokenizer


class Stage:
    heads: tuple[str, ...] = ("lm",)
    objective = staticmethod(objectives.next_token)

    def batch_spec(self, config) -> dict[str, tuple[int, ...]]:
        return {k: (config.batch_size, config.seq_len) for k in LM_FEATURES}

    def local_batch(self, config) -> int:
        return config.batch_size // jax.process_count()

    # -- tokenizer ---------------------------------------------------------------------
    def tokenizer(self, config, workdir: str) -> Tokenizer:
        """config.data.tokenizer (copied into the workdir), else WORKDIR/tokenizer.model,
        else one trained on the training documents with the model's vocabulary size."""
        dest = os.path.join(workdir, "tokenizer.model")
        if config.data.tokenizer:
            tok = Tokenizer(config.data.tokenizer)
            if os.path.abspath(config.data.tokenizer) != os.path.abspath(dest):
                shutil.copy(config.data.tokenizer, dest + ".tmp")
                os.replace(dest + ".tmp", dest)
            return tok
        if os.path.exists(dest):
            return Tokenizer(dest)
        return self.train_tokenizer(config, dest)

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
        from llama_jax import checkpoint, sharding

        if config.init_from:
            target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                            sharding.abstract_params(model), param_sh)
            return checkpoint.load_params(config.init_from, target)
        params, _ = sharding.init_params(model, jax.random.key(config.seed), mesh, rules)
        return params

    def eval_extras(self, ev: dict) -> dict:
        return {}

    def after_training(self, config, workdir, model, params, tokenizer, progress) -> None:
        pass


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

    def eval_extras(self, ev: dict) -> dict:
        return {"eval_perplexity": math.exp(min(ev["eval_loss"], 50.0))}

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


STAGES = {"pretrain": PretrainStage}
