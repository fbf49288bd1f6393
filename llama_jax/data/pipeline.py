"""What every input pipeline shares: per-process sharding, seeded shuffling, the
next-token example layout, batching, prefetch, and a checkpointable iterator.

The language-model batch layout (pretraining, SFT, rejection-sampled targets, GAtt) is
one dict of [B, T] numpy arrays:

  tokens       int32  model input
  targets      int32  next token (tokens shifted left within the row)
  loss_mask    float32 1 where `targets` is trained: same segment, and the target token
               is trained (answer tokens + EOS for chat; every token for pretraining)
  segment_ids  int32  1, 2, ... per packed example; 0 = padding
  positions    int32  position within each segment (RoPE); a document cut at a row's
               end continues in a later row as a new segment starting at position 0

The last position of each row has no target (its loss_mask is 0): packing loses one
trained token per row, in exchange for rows that never need a sequence of T + 1.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Iterator

import grain
import numpy as np

from llama_jax.data.sources import DataError

LM_FEATURES = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def default_shard() -> tuple[int, int]:
    """(this process's index, number of processes), from JAX's multi-controller runtime."""
    import jax

    return jax.process_index(), jax.process_count()


def sharded_shuffled(source, seed: int, shard: tuple[int, int] | None, num_epochs: int | None,
                     shuffle: bool = True) -> grain.MapDataset:
    """Documents of this process (a fixed, disjoint slice per process), shuffled by
    `seed` (differently but deterministically each epoch), repeated `num_epochs` times
    (None = forever)."""
    index, count = default_shard() if shard is None else shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    if count > len(source) and num_epochs is None:  # a training stream some process would have nothing of:
        # refused on every process alike (each knows the count), not only on those with an empty slice (the
        # others would wait for them in the first step). A held-out split may leave a process none: the
        # evaluation then stops at the first batch any process lacks, and the run warns at its start.
        raise DataError(f"{getattr(source, 'files', None) or type(source).__name__}: {len(source)} documents for "
                        f"{count} processes; process {count - 1} would get none (each process reads whole documents)")
    ds = grain.MapDataset.source(source)
    if count > 1:
        ds = ds[index::count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds


def lm_example(tokens: np.ndarray, token_mask: np.ndarray, segment_ids: np.ndarray,
               positions: np.ndarray) -> dict[str, np.ndarray]:
    """One packed row -> the next-token layout above. token_mask[t]: is token t trained
    as a target."""
    tokens = np.asarray(tokens, np.int32)
    seg = np.asarray(segment_ids, np.int32)
    targets = np.roll(tokens, -1)
    mask = np.roll(np.asarray(token_mask, bool), -1) & (np.roll(seg, -1) == seg) & (seg != 0)
    mask[-1] = False
    return {"tokens": tokens, "targets": targets, "loss_mask": mask.astype(np.float32),
            "segment_ids": seg, "positions": np.asarray(positions, np.int32)}


def pad_row(tokens: np.ndarray, token_mask: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """A single example right-padded to `length` (segment 1, padding segment 0)."""
    n = min(len(tokens), length)
    out_tokens = np.zeros(length, np.int32)
    out_mask = np.zeros(length, bool)
    seg = np.zeros(length, np.int32)
    out_tokens[:n], out_mask[:n], seg[:n] = tokens[:n], token_mask[:n], 1
    return lm_example(out_tokens, out_mask, seg, np.where(seg > 0, np.arange(length), 0))


def packed_to_lm(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output of Grain's packers (features `tokens`, `mask`, with `tokens_segment_ids`
    and `tokens_positions`) -> the next-token layout."""
    return lm_example(row["tokens"], row["mask"], row["tokens_segment_ids"], row["tokens_positions"])


def finish(ds: grain.IterDataset, batch_size: int, prefetch: int, drop_remainder: bool = True) -> grain.IterDataset:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def pad_batch(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A last, short batch padded with rows of zeros to `rows`: no segment, no trained
    token, so every objective gives them no weight (preference rows: see objectives)."""
    n = len(next(iter(batch.values())))
    if n >= rows:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


_LIVE: "weakref.WeakSet[Batches]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stops prefetch threads before interpreter teardown (else they complain)."""
    for b in list(_LIVE):
        b.close()
    import gc

    gc.collect()  # let closed iterators go while their modules are still intact


class Batches:
    """A checkpointable iterator of numpy batches: `state()` is a small JSON-able dict
    saved with every checkpoint; `restore(state)` continues exactly where it was.
    `rows_per_epoch`: the batch rows one pass over the data makes, where known
    (`estimated`: from a sample, as for packed dialogs), for the run's epoch count."""

    def __init__(self, dataset: grain.IterDataset, description: dict[str, Any] | None = None,
                 rows_per_epoch: float | None = None, estimated: bool = False):
        self.dataset = dataset
        self.description = description or {}
        self.rows_per_epoch, self.estimated = rows_per_epoch, estimated  # one pass over the data, in batch rows
        self._it = iter(dataset)
        _LIVE.add(self)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = iter(())  # drop the (possibly prefetching) iterator

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def state(self) -> dict:
        return self._it.get_state()

    def restore(self, state: dict) -> None:
        self.close()
        self._it = iter(self.dataset)
        self._it.set_state(state)
