"""Chat / SFT input: JSONL dialogs (`{"messages": [{"role", "content"}, ...]}`, ending
with an assistant message) -> Llama 2-Chat tokens with a loss mask on answer tokens and
EOS -> several dialogs packed per row (first-fit, never split; segment ids and positions
recorded) or one dialog per row, right-padded -> batches in the next-token layout.

A dialog longer than seq_len is truncated to its first seq_len tokens. With
`last_turn_only` (Ghost Attention) only the final answer of each dialog is trained.
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from llama_jax.data import pipeline, sources
from llama_jax.data.sources import DataError
from llama_jax.tokenizer import DialogError, _turns

log = logging.getLogger(__name__)


def validate_messages(record: dict, where: str, last: str) -> None:
    messages = sources.require(record, where, "messages", list)
    try:
        _turns(messages, last=last)
    except DialogError as e:
        raise DataError(f"{where}: {e}") from None


def open_dialogs(patterns) -> sources.Jsonl:
    return sources.Jsonl(patterns, validate=lambda r, w: validate_messages(r, w, "assistant"))


class _Encode:
    def __init__(self, tokenizer, seq_len: int, last_turn_only: bool, source: str):
        self.tokenizer, self.seq_len, self.last_turn_only, self.source = tokenizer, seq_len, last_turn_only, source
        self.warned = False

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        tokens, mask = self.tokenizer.encode_dialog_for_training(record["messages"], self.last_turn_only)
        if len(tokens) > self.seq_len and not self.warned:  # once: every epoch encodes every dialog again
            self.warned = True
            log.warning("%s: a dialog of %d tokens is truncated to seq_len=%d, losing its end (reported once; "
                        "dialogs longer than seq_len train only their first seq_len tokens)", self.source,
                        len(tokens), self.seq_len)
        return {"tokens": np.asarray(tokens[: self.seq_len], np.int32),
                "mask": np.asarray(mask[: self.seq_len], np.int32)}


def make_dataset(patterns, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *, pack: bool = True,
                 last_turn_only: bool = False, shard: tuple[int, int] | None = None, num_epochs: int | None = None,
                 shuffle: bool = True, prefetch: int = 2) -> pipeline.Batches:
    dialogs = open_dialogs(patterns)
    ds = pipeline.sharded_shuffled(dialogs, seed, shard, num_epochs, shuffle=shuffle)
    ds = ds.map(_Encode(tokenizer, seq_len, last_turn_only, ",".join(dialogs.files))).to_iter_dataset()
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"tokens": seq_len, "mask": seq_len}, num_packing_bins=max(batch_size, 8),
            seed=seed, shuffle_bins=shuffle)
        ds = ds.map(pipeline.packed_to_lm)
    else:
        ds = ds.map(lambda ex: pipeline.pad_row(ex["tokens"], ex["mask"], seq_len))
    return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch),
                            {"source": ",".join(dialogs.files), "dialogs": len(dialogs), "pack": pack})
