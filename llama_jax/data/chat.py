"""Chat / SFT input: JSONL dialogs (`{"messages": [{"role", "content"}, ...]}`, ending
with an assistant message) -> Llama 2-Chat tokens with a loss mask on answer tokens and
EOS -> several dialogs packed per row (first-fit, never split; segment ids and positions
recorded) or one dialog per row, right-padded -> batches in the next-token layout.

A dialog longer than seq_len is truncated to its first seq_len tokens (counted in the
batches' description, with those that keep no trained token). With
`last_turn_only` (Ghost Attention) only the final answer of each dialog is trained.
"""

from __future__ import annotations

import grain
import numpy as np

from llama_jax.data import pipeline, sources
from llama_jax.data.sources import DataError
from llama_jax.tokenizer import DialogError, _turns


def validate_messages(record: dict, where: str, last: str) -> None:
    messages = sources.require(record, where, "messages", list)
    try:
        _turns(messages, last=last)
    except DialogError as e:
        raise DataError(f"{where}: {e}") from None


def open_dialogs(patterns) -> sources.Jsonl:
    return sources.Jsonl(patterns, validate=lambda r, w: validate_messages(r, w, "assistant"))


class _Encode:
    def __init__(self, tokenizer, seq_len: int, last_turn_only: bool):
        self.tokenizer, self.seq_len, self.last_turn_only = tokenizer, seq_len, last_turn_only

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        tokens, mask = self.tokenizer.encode_dialog_for_training(record["messages"], self.last_turn_only)
        return {"tokens": np.asarray(tokens[: self.seq_len], np.int32),
                "mask": np.asarray(mask[: self.seq_len], np.int32)}


class _Lengths:
    """Validates each dialog as it is opened and counts those longer than seq_len, and
    those of them with no trained token left within it (an answer that starts after it)."""

    def __init__(self, tokenizer, seq_len: int, last_turn_only: bool):
        self.tokenizer, self.seq_len, self.last_turn_only = tokenizer, seq_len, last_turn_only
        self.truncated, self.untrained, self.first_untrained = 0, 0, ""
        self.empty: list[str] = []  # where a trained answer is blank (the model learns to answer with EOS)

    def __call__(self, record: dict, where: str) -> None:
        validate_messages(record, where, "assistant")
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        if any(not a.strip() for a in (answers[-1:] if self.last_turn_only else answers)):
            self.empty.append(where)
        # SentencePiece gives at most one token per UTF-8 byte (+ the dummy prefix), and the format adds fewer than
        # 48 a message: a dialog below that bound cannot be longer than seq_len, and is not tokenized to count it
        if sum(len(m["content"].encode("utf-8")) + 48 for m in record["messages"]) <= self.seq_len:
            return
        tokens, mask = self.tokenizer.encode_dialog_for_training(record["messages"], self.last_turn_only)
        if len(tokens) > self.seq_len:
            self.truncated += 1
            if not any(mask[1: self.seq_len]):  # token 0 (BOS) is never a target
                self.untrained += 1
                self.first_untrained = self.first_untrained or where


def make_dataset(patterns, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *, pack: bool = True,
                 last_turn_only: bool = False, shard: tuple[int, int] | None = None, num_epochs: int | None = None,
                 shuffle: bool = True, prefetch: int = 2) -> pipeline.Batches:
    """Batches of dialogs; their description counts the dialogs longer than seq_len
    (`truncated`, keeping their first seq_len tokens) and those that keep no trained token
    (`no_trained_token`): a source of nothing but such dialogs is a DataError."""
    lengths = _Lengths(tokenizer, seq_len, last_turn_only)
    dialogs = sources.Jsonl(patterns, validate=lengths)
    files = ",".join(dialogs.files)
    if lengths.untrained == len(dialogs):
        raise DataError(f"{files}: no dialog has a trained token within seq_len={seq_len}: every answer starts "
                        f"after it (e.g. {lengths.first_untrained}); a larger seq_len, or shorter prompts")
    ds = pipeline.sharded_shuffled(dialogs, seed, shard, num_epochs, shuffle=shuffle)
    ds = ds.map(_Encode(tokenizer, seq_len, last_turn_only)).to_iter_dataset()
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"tokens": seq_len, "mask": seq_len}, num_packing_bins=max(batch_size, 8),
            seed=seed, shuffle_bins=shuffle)
        ds = ds.map(pipeline.packed_to_lm)
    else:
        ds = ds.map(lambda ex: pipeline.pad_row(ex["tokens"], ex["mask"], seq_len))
    description = {"source": files, "dialogs": len(dialogs), "pack": pack}
    if lengths.truncated:
        description["truncated"] = f"{lengths.truncated:,} (longer than seq_len {seq_len}: their first {seq_len} " \
                                   "tokens train)"
    if lengths.empty:
        description["empty_answers"] = f"{len(lengths.empty):,} dialogs (first: {lengths.empty[0]})"
    if lengths.untrained:
        description["no_trained_token"] = f"{lengths.untrained:,} (every answer after seq_len; first: " \
                                          f"{lengths.first_untrained})"
    return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch), description)
