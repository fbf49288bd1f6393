"""Prompts for RLHF (rejection sampling, PPO, GAtt, context distillation).

JSONL, one prompt per line: {"messages": [... ending with a user turn], "is_safety": bool
(optional)}. Prompts are small and are read whole; the rollout code batches them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_jax.data import sources
from llama_jax.data.chat import validate_messages
from llama_jax.data.sources import DataError


@dataclass(frozen=True)
class Prompt:
    messages: list
    is_safety: bool
    tokens: list  # Llama 2-Chat prompt tokens (Tokenizer.encode_dialog)
    where: str  # file:line
    record: dict  # the whole JSONL record (e.g. a toy prompt's `reference` answer)


def _validate(record: dict, where: str) -> None:
    validate_messages(record, where, last="user")
    if "is_safety" in record and not isinstance(record["is_safety"], bool):
        raise DataError(f"{where}: field 'is_safety' must be true/false, got {record['is_safety']!r}")


def check(patterns) -> sources.Jsonl | None:
    """Opens and checks prompt files (each record, by file:line) without tokenizing them:
    what a stage does at its start for the prompts it reads only later. None for no file
    or the toy prompts."""
    if patterns and patterns != "synthetic":
        return sources.Jsonl(patterns, validate=_validate)
    return None


def load(patterns, tokenizer, max_prompt_len: int | None = None, shard: tuple[int, int] | None = None
         ) -> list[Prompt]:
    """All prompts (this process's share of them when `shard` is given)."""
    src = sources.Jsonl(patterns, validate=_validate)
    index, count = shard or (0, 1)
    out = []
    for i in range(index, len(src), count):
        rec = src.record(i)
        tokens = tokenizer.encode_dialog(rec["messages"])
        if max_prompt_len is not None and len(tokens) > max_prompt_len:
            raise DataError(f"{src.where(i)}: prompt has {len(tokens)} tokens, more than max_prompt_len "
                            f"{max_prompt_len}")
        out.append(Prompt(rec["messages"], bool(rec.get("is_safety", False)), tokens, src.where(i), rec))
    return out
