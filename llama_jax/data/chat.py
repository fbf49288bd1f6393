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
    if "messages" not in record and record:
        if last == "user":
            raise DataError(f"{where}: missing field 'messages' (it has {sorted(record)}); a prompt is "
                            '{"messages": [{"role": "system", "content": ...} (optional), {"role": "user", "content": '
                            '...}]}, ending with a user message (earlier turns alternate user, assistant)')
        raise DataError(f"{where}: missing field 'messages' (it has {sorted(record)}); a dialog is "
                        '{"messages": [{"role": "system", "content": ...} (optional), {"role": "user", "content": '
                        '...}, {"role": "assistant", "content": ...}, ...]}: write prompt/response pairs as a user '
                        "and an assistant message")
    messages = sources.require(record, where, "messages", list)
    try:
        _turns(messages, last=last)
    except DialogError as e:
        raise DataError(f"{where}: {e}") from None


# A dialog's fields besides "messages" that need no reader: ids, what the toy tasks and exact-match
# evaluation carry, and the scores the RLHF stages record beside the dialogs they write. Any other is named
# in the run's description, since it is not trained on: a top-level "system" prompt, or a message's "weight"
# of 0 (OpenAI's format), would otherwise be ignored silently.
UNREAD_OK = frozenset({"messages", "id", "task", "is_safety", "reference", "source", "meta", "metadata", "reward",
                       "safety_reward", "preprompt"})


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
        self.bytes: list[int] = []  # each dialog's UTF-8 bytes with the format's overhead (for the epoch estimate)
        self.unread: dict[str, str] = {}  # a field no reader reads (a top-level "system", a message's "weight")
        #                                   -> where it first is

    def __call__(self, record: dict, where: str) -> None:
        validate_messages(record, where, "assistant")
        for f in record.keys() - UNREAD_OK - self.unread.keys():
            self.unread[f] = where
        for m in record["messages"]:
            for f in m.keys() - {"role", "content"}:
                self.unread.setdefault(f"messages[].{f}", where)
        self.bytes.append(sum(len(m["content"].encode("utf-8")) + 16 for m in record["messages"]))
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


def first_fit_rows(lengths, seq_len: int, bins: int) -> int:
    """The rows Grain's first-fit packer makes of sequences of these lengths: each goes
    into the first of `bins` open rows with room; one that fits none emits them all."""
    rows, open_rows = 0, []
    for n in lengths:
        for i, used in enumerate(open_rows):
            if used + n <= seq_len:
                open_rows[i] += n
                break
        else:
            if len(open_rows) == bins:
                rows, open_rows = rows + bins, []
            open_rows.append(n)
    return rows + len(open_rows)


def make_dataset(patterns, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *, pack: bool = True,
                 last_turn_only: bool = False, shard: tuple[int, int] | None = None, num_epochs: int | None = None,
                 shuffle: bool = True, prefetch: int = 2, drop_remainder: bool = True) -> pipeline.Batches:
    """Batches of dialogs (`drop_remainder=False`: the last may have fewer rows, for a
    complete read); their description counts the dialogs longer than seq_len
    (`truncated`, keeping their first seq_len tokens) and those that keep no trained token
    (`no_trained_token`): a source of nothing but such dialogs is a DataError."""
    lengths = _Lengths(tokenizer, seq_len, last_turn_only)
    dialogs = sources.Jsonl(patterns, validate=lengths)
    files = ",".join(dialogs.files)
    if lengths.untrained == len(dialogs):
        raise DataError(f"{files}: no dialog has a trained token within seq_len={seq_len}: every answer starts "
                        f"after it (e.g. {lengths.first_untrained}); a larger seq_len, or shorter prompts")
    bins = max(batch_size, 8)
    rows, estimated = float(len(dialogs)), False
    if pack:  # packed rows an epoch: each dialog's tokens estimated (a sample's tokens per byte), packed as below
        sample = np.linspace(0, len(dialogs) - 1, min(len(dialogs), 200)).astype(int)
        tokens = [len(tokenizer.encode_dialog_for_training(dialogs.record(int(i))["messages"])[0]) for i in sample]
        per_byte = sum(tokens) / max(sum(lengths.bytes[i] for i in sample), 1)
        rows = float(first_fit_rows([min(max(int(round(b * per_byte)), 1), seq_len) for b in lengths.bytes], seq_len,
                                    bins))
        estimated = True
    ds = pipeline.sharded_shuffled(dialogs, seed, shard, num_epochs, shuffle=shuffle)
    ds = ds.map(_Encode(tokenizer, seq_len, last_turn_only)).to_iter_dataset()
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"tokens": seq_len, "mask": seq_len}, num_packing_bins=bins,
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
    if lengths.unread:
        description["unread_fields"] = ", ".join(f"{f!r} (at {w})" for f, w in sorted(lengths.unread.items())) + \
            ": not read (a system prompt is a first message of role system; every answer is trained)"
    if lengths.untrained:
        description["no_trained_token"] = f"{lengths.untrained:,} (every answer after seq_len; first: " \
                                          f"{lengths.first_untrained})"
    return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch, drop_remainder), description, rows, estimated)
