"""Pretraining input: documents -> tokens with BOS/EOS -> packed into seq_len windows
(concat-then-split, segment ids and positions recorded) -> batches.

Sources are named by one string, so a config override switches them:

  stdlib            the embedded default corpus (train split); `stdlib:eval` held out
  text:GLOB[,GLOB]  text files, one document each
  jsonl:GLOB        JSONL with a `text` field
  shards:DIR        pre-tokenized ArrayRecord shards (python -m llama_jax.data.prepare)
  synthetic         uniformly random tokens (benchmarks)

Sources of several kinds, comma-separated (`text:code/*.py,jsonl:prose/*.jsonl`), are one
corpus: their documents are shuffled together. A source ending in `@WEIGHT` takes a seeded
share of its documents (`jsonl:wiki/*.jsonl@3` repeats each three times, `text:web/*@0.25`
keeps a quarter); without one, each source's share is that of its documents.
"""

from __future__ import annotations

import grain
import numpy as np

from llama_jax.data import pipeline, sources
from llama_jax.data.sources import DataError

KINDS = ("stdlib", "text", "jsonl", "shards", "synthetic")
# Documents tokenized ahead of the packer: Grain's default (16 threads, 500 documents) held
# many copies of a corpus that is one large text file (a 30 MB file ran a process out of
# 19 GB); a few threads and a short buffer still deliver far more than a step consumes.
READ_AHEAD = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def parse_source(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise DataError(f"data source {spec!r}: unknown kind {kind!r}; use one of {KINDS} (e.g. 'jsonl:data/*.jsonl')")
    if kind in ("text", "jsonl", "shards") and not arg:
        raise DataError(f"data source {spec!r}: {kind} needs a path, e.g. '{kind}:/data/*'")
    return kind, arg


def split_source(spec: str) -> list[str]:
    """The sources of a spec: a comma starts a new one where a KIND: prefix follows it
    (`text:a/*.txt,b/*.txt,jsonl:c.jsonl` is two: text files of two globs, and a JSONL).
    Each keeps its `@WEIGHT`, if any (see `weighted`)."""
    parts: list[str] = []
    for piece in spec.split(","):
        bare = sources.split_fraction(piece.strip(), spec)[0]  # without a weight: "stdlib@2" is stdlib
        head, colon, _ = bare.partition(":")
        if parts and not (head in KINDS and (colon or bare in ("stdlib", "synthetic"))):
            parts[-1] += "," + piece
        else:
            parts.append(piece.strip())
    return parts


def weighted(part: str, spec: str) -> tuple[str, float]:
    """One source of `split_source` -> (the source without its weight, the weight: 1.0 if none)."""
    return sources.split_fraction(part, spec)


def source_kinds(spec: str) -> list[str]:
    """The kind of each source of a spec (checked as `parse_source` checks one)."""
    parts = [weighted(part, spec) for part in split_source(spec)]
    kinds = [parse_source(part)[0] for part, _ in parts]
    if "synthetic" in kinds and (len(kinds) > 1 or parts[0][1] != 1.0):
        raise DataError(f"data source {spec!r}: synthetic tokens are a source of their own, not part of a corpus "
                        "(and take no weight)")
    return kinds


class Share:
    """A seeded share of a source's documents, as a source: every document int(weight)
    times (read in place, no index of them), then a seeded subset of round(weight x n) -
    int(weight) x n more. A share of no document is an error naming it."""

    def __init__(self, source, weight: float, rng: np.random.Generator, what: str, spec: str):
        n = len(source)
        self.source, self.n, self.whole, self.what = source, n, int(weight), what
        rest = int(round(weight * n)) - self.whole * n
        if n and self.whole * n + rest <= 0:
            raise DataError(f"data mixture {spec!r}: {what}@{weight:g} takes no document of its {n} (a larger "
                            "weight, or leave it out)")
        self.extra = np.sort(rng.choice(n, rest, replace=False)).astype(np.uint32 if n < 2**32 else np.int64) \
            if rest > 0 else np.zeros(0, np.uint32)
        self.empty = getattr(source, "empty", 0)
        self.identity = getattr(source, "identity", None)

    def __len__(self) -> int:
        return self.whole * self.n + len(self.extra)

    def __getitem__(self, i: int):
        i = int(i)
        return self.source[i % self.n if i < self.whole * self.n else int(self.extra[i - self.whole * self.n])]


class Concat:
    """Several document sources as one (random access over all of their documents)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.empty = sum(getattr(p, "empty", 0) for p in parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


def open_documents(spec: str, split: str = "train", seed: int = 0):
    """A random-access source of documents (str, or int32 token arrays for shards); the
    shares of weighted sources are drawn with `seed`."""
    parts = split_source(spec)
    source_kinds(spec)
    rng = np.random.default_rng([seed, 7])
    opened = []
    for part in parts:
        source, weight = weighted(part, spec)
        docs = _open_one(source, split)
        opened.append(docs if weight == 1.0 else Share(docs, weight, rng, source, spec))
    return opened[0] if len(opened) == 1 else Concat(opened)


def _open_one(spec: str, split: str):
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
                 vocab_size: int | None = None, drop_remainder: bool = True,
                 share_seed: int | None = None) -> pipeline.Batches:
    """Batches of packed pretraining windows ([batch_size, seq_len] per feature). The
    eval split reads its documents once, in order (`num_epochs=1`, no shuffle).
    `drop_remainder=False`: the last batch may have fewer rows (a complete read).
    `share_seed` (default `seed`) draws weighted sources' shares: another order of the
    same corpus keeps it."""
    kind = source_kinds(spec)[0]
    if kind == "synthetic":
        if vocab_size is None:
            vocab_size = tokenizer.vocab_size
        ds = _synthetic(vocab_size, seq_len, seed, shard).to_iter_dataset()
        return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch), {"source": spec})
    docs = open_documents(spec, split, seed if share_seed is None else share_seed)
    for part, opened in zip(split_source(spec), docs.parts if isinstance(docs, Concat) else [docs]):
        opened = opened.source if isinstance(opened, Share) else opened
        if isinstance(opened, sources.TokenShards):
            made_with = opened.metadata.get("tokenizer", {}).get("sha256")
            if tokenizer is not None and made_with not in (None, tokenizer.identity()["sha256"]):
                raise DataError(f"{part}: shards were tokenized with a different tokenizer (sha256 {made_with[:12]}"
                                f"..., this run's is {tokenizer.identity()['sha256'][:12]}...)")
    training = split == "train"
    ds = pipeline.sharded_shuffled(docs, seed, shard, num_epochs if training else 1, shuffle=training)
    ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset(READ_AHEAD)
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len, "mask": seq_len})
    ds = ds.map(pipeline.packed_to_lm)
    identity, empty = getattr(docs, "identity", None), getattr(docs, "empty", 0)
    shares = [p for p in (docs.parts if isinstance(docs, Concat) else [docs]) if isinstance(p, Share)]
    mix = {"weighted": "; ".join(f"{p.what} {len(p):,} of {p.n:,}" for p in shares)} if shares else {}
    return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch, drop_remainder),
                            {"source": spec, "documents": len(docs), **mix,
                             **({"corpus": identity} if identity else {}),
                             **({"empty files left out": empty} if empty else {})})
