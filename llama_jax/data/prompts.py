"""Prompts for RLHF (rejection sampling, PPO, GAtt, context distillation).

JSONL, one prompt per line: {"messages": [... ending with a user turn], "is_safety": bool
(optional), "preprompt": str (optional: safety context distillation's preprompt for this
prompt, e.g. its risk category's answer template)}. Prompts are small and are read whole;
the rollout code batches them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_jax.data import sources
from llama_jax.data.chat import validate_messages
from llama_jax.data.sources import DataError
from llama_jax.tokenizer import first_tag


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
    if "preprompt" in record and (not isinstance(record["preprompt"], str) or not record["preprompt"].strip()):
        raise DataError(f"{where}: field 'preprompt' must be a non-empty string, got {record['preprompt']!r}")
    if "preprompt" in record and (tag := first_tag(record["preprompt"])):
        raise DataError(f"{where}: field 'preprompt': the chat format's tag {tag[1]!r} "
                        "cannot be inside a preprompt (it goes into a message)")


# what the stages read (reference, task: toy prompts; preprompt: safety distillation's targeted one)
FIELDS = ("messages", "is_safety", "reference", "task", "preprompt")


def check(patterns) -> sources.Jsonl | None:
    """Opens and checks prompt files (each record, by file:line) without tokenizing them:
    what a stage does at its start for the prompts it reads only later. None for no file
    or the toy prompts. A field that looks like a misspelt one it reads ("is_saftey",
    "is_safety_prompt": its prompts would all count as helpfulness prompts) is warned."""
    if patterns and patterns != "synthetic":
        src = sources.Jsonl(patterns, validate=_validate)
        for field, (where, meant) in misspelt_fields(src).items():
            from llama_jax import distributed

            distributed.say(f"warning: {where}: field {field!r} is not read (meant {meant!r}?)", flush=True)
        return src
    return None


def misspelt_fields(src: sources.Jsonl) -> dict[str, tuple[str, str]]:
    """{field: (where it first is, the read field it is close to)} for fields no stage
    reads that are near one it does."""
    import difflib

    out: dict[str, tuple[str, str]] = {}
    for i in range(len(src)):
        for f in src.record(i).keys() - set(FIELDS) - out.keys():
            near = difflib.get_close_matches(f, FIELDS, n=1, cutoff=0.6)
            if near:
                out[f] = (src.where(i), near[0])
    return out


def load(patterns, tokenizer, max_prompt_len: int | None = None, shard: tuple[int, int] | None = None,
         limit: str = "") -> list[Prompt]:
    """All prompts (this process's share of them when `shard` is given); one longer than
    `max_prompt_len` tokens is a DataError naming its line and `limit`, the settings the
    bound comes from ("config.seq_len - config.rlhf.max_new_tokens")."""
    src = sources.Jsonl(patterns, validate=_validate)
    index, count = shard or (0, 1)
    out = []
    for i in range(index, len(src), count):
        rec = src.record(i)
        tokens = tokenizer.encode_dialog(rec["messages"])
        if max_prompt_len is not None and len(tokens) > max_prompt_len:
            raise DataError(f"{src.where(i)}: prompt has {len(tokens)} tokens, more than "
                            + (f"the {max_prompt_len} that {limit} leaves" if limit else
                               f"max_prompt_len {max_prompt_len}"))
        out.append(Prompt(rec["messages"], bool(rec.get("is_safety", False)), tokens, src.where(i), rec))
    return out
