"""Pretraining input: documents -> tokens with BOS/EOS -> packed into seq_len windows
(concat-then-split, segment ids and positions recorded) -> batches.

Sources are named by one string, so a config override switches them:

  stdlib            the embedded default corpus (train split); `stdlib:eval` held out
  text:GLOB[,GLOB]  text files, one document each
  jsonl:GLOB        JSONL with a `text` field
  shards:DIR        pre-tokenized ArrayRecord shards (python -m llama_jax.data.prepare)
  synthetic         uniformly random tokens (benchmarks)
"""

from __future__ import annotations

import grain
import numpy as np

from llama_jax.data import pipeline, sources
from llama_jax.data.sources import DataError

KINDS = ("stdlib", "text", "jsonl", "shards", "synthetic")


def parse_source(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise DataError(f"data source {spec!r}: unknown kind {kind!r}; use one of {KINDS} (e.g. 'jsonl:data/*.jsonl')")
    if kind in ("text", "jsonl", "shards") and not arg:
        raise DataError(f"data source {spec!r}: {kind} needs a path, e.g. '{kind}:/data/*'")
    return kind, arg


def open_documents(spec: str, split: str = "train"):
    """A random-access source of documents (str, or int32 token arrays for shards)."""
    kind, arg = parse_source(spec)
    if kind == "stdlib":
        return sources.StdlibCorpus(arg or split)
    if kind == "text":
        return sources.TextFiles(arg)
    if kind == "jsonl":
        return sources.text_jsonl(arg)
    if kind == "shards":
        return sources.TokenShards(arg)
    raise DataError(f"data source {spec!r} has no documents")


class _Tokenize:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, doc) -> dict[str, np.ndarray]:
        if isinstance(doc, str):
            tokens = np.asarray(self.tokenizer.encode(doc, bos=True, eos=True), np.int32)
        else:  # pre-tokenized
            tokens = doc
        return {"tokens": tokens, "mask": np.ones(len(tokens), np.int32)}


def _synthetic(vocab_size: int, seq_len: int, seed: int, shard) -> grain.MapDataset:
    index, count = pipeline.default_shard() if shard is None else shard

    def row(i):  # this process's i-th row is row i * count + index of one global stream, so the rows of
        # each global batch are the same whatever the number of processes (only their order differs)
        rng = np.random.default_rng([seed, i * count + index])
        tokens = rng.integers(3, vocab_size, seq_len, dtype=np.int32)
        return pipeline.lm_example(tokens, np.ones(seq_len, bool), np.ones(seq_len, np.int32), np.arange(seq_len))

    return grain.MapDataset.range(2**62).map(row)


def make_dataset(spec: str, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *, split: str = "train",
                 shard: tuple[int, int] | None = None, num_epochs: int | None = None, prefetch: int = 2,
                 vocab_size: int | None = None, drop_remainder: bool = True) -> pipeline.Batches:
    """Batches of packed pretraining windows ([batch_size, seq_len] per feature). The
    eval split reads its documents once, in order (`num_epochs=1`, no shuffle).
    `drop_remainder=False`: the last batch may have fewer rows (a complete read)."""
    kind, _ = parse_source(spec)
    if kind == "synthetic":
        if vocab_size is None:
            vocab_size = tokenizer.vocab_size
        ds = _synthetic(vocab_size, seq_len, seed, shard).to_iter_dataset()
        return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch), {"source": spec})
    docs = open_documents(spec, split)
    if isinstance(docs, sources.TokenShards):
        made_with = docs.metadata.get("tokenizer", {}).get("sha256")
        if tokenizer is not None and made_with not in (None, tokenizer.identity()["sha256"]):
            raise DataError(f"{spec}: shards were tokenized with a different tokenizer "
                            f"(sha256 {made_with[:12]}..., this run's is {tokenizer.identity()['sha256'][:12]}...)")
    training = split == "train"
    ds = pipeline.sharded_shuffled(docs, seed, shard, num_epochs if training else 1, shuffle=training)
    ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len, "mask": seq_len})
    ds = ds.map(pipeline.packed_to_lm)
    identity, empty = getattr(docs, "identity", None), getattr(docs, "empty", 0)
    return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch, drop_remainder),
                            {"source": spec, "documents": len(docs), **({"corpus": identity} if identity else {}),
                             **({"empty files left out": empty} if empty else {})})
