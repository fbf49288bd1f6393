"""Preference pairs for reward models and DPO.

JSONL, one pair per line (several sources mix as `a/*.jsonl@1.0,b/*.jsonl@0.25`):
  {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str,
   "rating": "significantly_better" | "better" | "slightly_better" | "negligibly_better",  (optional;
             the paper's "Significantly better" ... "Negligibly better / unsure" too)
   "is_safety_prompt": bool, "chosen_safe": bool, "rejected_safe": bool}                   (optional)
Other fields are not read; the run's `training data:` line names them (`unread_fields`),
beside how many pairs are rated and safety-labelled.

Pairs whose chosen answer is unsafe while the rejected one is safe are dropped, as in the
paper (section 3.2.1). The margin m(rating) of the ranking loss comes from the paper's
Table 27: `small` (1, 2/3, 1/3, 0), `large` (3, 2, 1, 0), or `none`.

A batch holds both sides in the next-token layout, prefixed `chosen_` and `rejected_`
([B, T] each; one right-padded example per row, so the reward head reads the last real
token), plus per pair: `margin` float32, `rating` int32 (index into RATINGS, -1 if
unrated), `is_safety_prompt`, `chosen_safe`, `rejected_safe` int32 (1, 0, or -1 unknown).
A pair longer than seq_len loses the same prompt tokens on both sides, after BOS, from the
start (the answers and the end of the prompt are what the reward head reads).
"""

from __future__ import annotations

import numpy as np

from llama_jax.data import pipeline, sources
from llama_jax.data.chat import validate_messages
from llama_jax.data.sources import DataError

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGINS = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}
SAFETY_FIELDS = ("is_safety_prompt", "chosen_safe", "rejected_safe")
FIELDS = ("prompt", "chosen", "rejected", "rating", *SAFETY_FIELDS, "task")  # task: a toy pair's, for evaluate


def rating_name(value) -> str | None:
    """A rating as RATINGS names it: the paper's labels are accepted as written too
    ("Significantly better", "negligibly better / unsure"); None for anything else."""
    if not isinstance(value, str):
        return None
    name = " ".join(value.lower().replace("_", " ").replace("-", " ").replace("/", " / ").split())
    for unsure in (" / unsure", " or unsure", " unsure"):
        name = name.removesuffix(unsure)
    name = "negligibly better" if name == "unsure" else name  # the paper's lowest rating is one label
    name = name.replace(" ", "_")
    return name if name in RATINGS else None


def _normalized(record: dict) -> dict:
    if record.get("rating") is not None:
        record["rating"] = rating_name(record["rating"])
    return record


def margin(rating: str | None, table: str) -> float:
    if table not in MARGINS:
        raise DataError(f"unknown margin table {table!r}; choose one of {sorted(MARGINS)}")
    return 0.0 if rating is None else MARGINS[table][RATINGS.index(rating)]


def validate_pair(record: dict, where: str) -> None:
    if "prompt" not in record and isinstance(record.get("chosen"), str):
        raise DataError(f"{where}: missing field 'prompt': a pair is {{\"prompt\": [messages ending with a user turn], "
                        "\"chosen\": answer, \"rejected\": answer}" + (
                            "; split an Anthropic HH transcript's shared turns into the prompt's messages and keep "
                            "the last Assistant turns as the answers" if "Human:" in record["chosen"] else ""))
    prompt = sources.require(record, where, "prompt", list)
    validate_messages({"messages": prompt}, where, last="user")
    for f in ("chosen", "rejected"):
        answer = sources.require(record, where, f, str)
        validate_messages({"messages": prompt + [{"role": "assistant", "content": answer}]}, f"{where}: {f}",
                          last="assistant")
    rating = record.get("rating")
    if rating is not None and rating_name(rating) is None:
        raise DataError(f"{where}: rating {rating!r} is not one of {RATINGS} (or the paper's labels: "
                        "'significantly better', ..., 'negligibly better / unsure')")
    for f in SAFETY_FIELDS:
        if f in record and record[f] is not None and not isinstance(record[f], bool):
            raise DataError(f"{where}: field {f!r} must be true/false, got {record[f]!r}")


def is_dropped(record: dict) -> bool:
    """Chosen unsafe and rejected safe: dropped, as in the paper."""
    return record.get("chosen_safe") is False and record.get("rejected_safe") is True


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """`GLOB[@FRACTION],GLOB[@FRACTION],...` -> [(glob, fraction)]; a fraction takes that
    share of the glob's pairs (seeded), above 1 repeats them (a data-mix config)."""
    return [sources.split_fraction(item, spec) for item in (p.strip() for p in spec.split(",") if p.strip())]


class PreferencePairs:
    """Validated pairs (a random-access source) from a mixture of JSONL globs (see
    `parse_mixture`), with the paper's filter applied."""

    def __init__(self, patterns: str, seed: int = 0):
        self.parts: list[sources.Jsonl] = []
        self.index: list[tuple[int, int]] = []  # (part, record)
        self.dropped = 0
        self.identical: list[str] = []  # where chosen == rejected: kept (no signal, but changing data changes runs)
        self.empty_chosen: list[str] = []  # where the chosen answer is blank: kept, counted (likely a data bug)
        self.empty_rejected: list[str] = []  # and the rejected one
        self.rated = self.safety_labelled = 0  # of the pairs used
        self.unread: dict[str, str] = {}  # field no reader reads (a misspelt "ratings" would lose every margin)
        #                                   -> where it first is
        rng = np.random.default_rng(seed)
        for p, (glob, fraction) in enumerate(parse_mixture(patterns)):
            jsonl = sources.Jsonl(glob, validate=validate_pair)
            records = [_normalized(jsonl.record(i)) for i in range(len(jsonl))]
            for i, r in enumerate(records):
                for f in r.keys() - set(FIELDS) - self.unread.keys():
                    self.unread[f] = jsonl.where(i)
            kept = [i for i, r in enumerate(records) if not is_dropped(r)]
            self.dropped += len(jsonl) - len(kept)
            picks = sources.share(len(kept), fraction, rng, glob, patterns, "pair")
            self.parts.append(jsonl)
            self.index += [(p, kept[i]) for i in picks.tolist()]
            used = [records[kept[i]] for i in picks.tolist()]
            picked = sorted({kept[i] for i in picks.tolist()})  # the pairs of the mixture, each named once
            self.identical += [jsonl.where(i) for i in picked if records[i]["chosen"] == records[i]["rejected"]]
            self.empty_chosen += [jsonl.where(i) for i in picked if not records[i]["chosen"].strip()]
            self.empty_rejected += [jsonl.where(i) for i in picked if not records[i]["rejected"].strip()]
            self.rated += sum(r.get("rating") is not None for r in used)
            self.safety_labelled += sum(r.get("chosen_safe") is not None or r.get("rejected_safe") is not None
                                        for r in used)
        self.files = [f for part in self.parts for f in part.files]
        if not self.index:
            raise DataError(f"{','.join(self.files)}: no usable preference pairs "
                            f"({self.dropped} dropped as chosen-unsafe/rejected-safe)")

    def unread_fields(self) -> str:
        """The fields no reader reads, with a guess at what each was meant to be."""
        import difflib

        def one(f):
            near = difflib.get_close_matches(f, FIELDS, n=1, cutoff=0.6)
            return f"{f!r} (at {self.unread[f]}" + (f"; meant {near[0]!r}?)" if near else ")")

        return ", ".join(one(f) for f in sorted(self.unread))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        part, record = self.index[i]
        return _normalized(self.parts[part].record(record))

    def where(self, i: int) -> str:
        part, record = self.index[i]
        return self.parts[part].where(record)

    def count_cut(self, encoder: "_EncodePair") -> tuple[int, list[str]]:
        """(pairs longer than the encoder's seq_len, where those are whose two sides are
        the same tokens once cut: they train nothing and count as wrong). Only pairs that
        could be too long (more UTF-8 bytes than seq_len, with the format's overhead) are
        tokenized."""
        truncated, same, seen = 0, [], {}
        for i, key in enumerate(self.index):
            if key not in seen:
                r = self[i]
                # a row is the prompt and one answer: at most a token per UTF-8 byte, and under 48 a message
                prompt_bytes = sum(len(m["content"].encode("utf-8")) + 48 for m in r["prompt"])
                longest = max(len(a.encode("utf-8")) for a in (r["chosen"], r["rejected"])) + 48
                if prompt_bytes + longest <= encoder.seq_len:
                    seen[key] = (False, False)
                else:
                    encoded = encoder.encode(r["prompt"], r["chosen"], r["rejected"])
                    seen[key] = encoder.was_cut(encoded, encoder.cut(encoded), r)
            truncated += seen[key][0]
            if seen[key][1]:
                same.append(self.where(i))
        return truncated, same


def _flag(value) -> int:
    return -1 if value is None else int(bool(value))


def cut_prompt(tokens: list, mask: list, over: int, seq_len: int) -> tuple[list, list]:
    """`tokens` / `mask` of a dialog less up to `over` prompt tokens taken after BOS, but
    never the prompt's last seq_len // 2 tokens (the question right before the final
    answer): what a row too long for its context loses first. The callers then keep a
    row's first seq_len tokens (an answer still too long loses its end)."""
    start = mask.index(True) if True in mask else len(mask)
    cut = min(over, max(0, start - 1 - seq_len // 2))
    return tokens[:1] + tokens[1 + cut:], mask[:1] + mask[1 + cut:]


class _EncodePair:
    def __init__(self, tokenizer, seq_len: int, margin_table: str):
        margin(None, margin_table)  # validates the table name
        self.tokenizer, self.seq_len, self.margin_table = tokenizer, seq_len, margin_table

    def sides(self, prompt, chosen: str, rejected: str) -> list[tuple[list[int], list[bool]]]:
        """Both answers after the prompt, as (tokens, mask). Only the final answer is
        masked: what DPO sums and a mean-pooled reward head reads. A pair longer than
        seq_len loses the same prompt tokens on both sides (after BOS, from the start, down
        to the prompt's last seq_len // 2 tokens), so that both answers are read after one
        context; an answer still too long loses its end (`cut_prompt`)."""
        return self.cut(self.encode(prompt, chosen, rejected))

    def encode(self, prompt, chosen: str, rejected: str) -> list[tuple[list[int], list[bool]]]:
        return [self.tokenizer.encode_dialog_for_training(prompt + [{"role": "assistant", "content": a}],
                                                          last_turn_only=True) for a in (chosen, rejected)]

    def was_cut(self, encoded: list, sides: list, record: dict) -> tuple[bool, bool]:
        """(whether a pair, `encoded` whole, is longer than seq_len; whether its two `sides`
        are then the same tokens though its answers differ)."""
        return (max(len(t) for t, _ in encoded) > self.seq_len,
                sides[0] == sides[1] and record["chosen"] != record["rejected"])

    def cut(self, encoded: list[tuple[list[int], list[bool]]]) -> list[tuple[list[int], list[bool]]]:
        starts = [mask.index(True) if True in mask else len(mask) for _, mask in encoded]  # where each answer begins
        over = max(len(tokens) for tokens, _ in encoded) - self.seq_len
        if over > 0 and starts[0] == starts[1]:
            encoded = [cut_prompt(tokens, mask, over, self.seq_len) for tokens, mask in encoded]
        return [(tokens[:self.seq_len], mask[:self.seq_len]) for tokens, mask in encoded]

    def __call__(self, rec: dict) -> dict[str, np.ndarray]:
        out = {}
        for side, (tokens, mask) in zip(("chosen", "rejected"), self.sides(rec["prompt"], rec["chosen"],
                                                                            rec["rejected"])):
            row = pipeline.pad_row(np.asarray(tokens, np.int32), np.asarray(mask, bool), self.seq_len)
            out.update({f"{side}_{k}": v for k, v in row.items()})
        rating = rec.get("rating")
        out["margin"] = np.float32(margin(rating, self.margin_table))
        out["rating"] = np.int32(-1 if rating is None else RATINGS.index(rating))
        for f in SAFETY_FIELDS:
            out[f] = np.int32(_flag(rec.get(f)))
        return out


def make_dataset(patterns, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *, margin_table: str = "small",
                 shard: tuple[int, int] | None = None, num_epochs: int | None = None, shuffle: bool = True,
                 prefetch: int = 2, drop_remainder: bool = True) -> pipeline.Batches:
    """Batches of encoded pairs (`drop_remainder=False`: the last may have fewer rows)."""
    pairs = PreferencePairs(patterns, seed)
    encoder = _EncodePair(tokenizer, seq_len, margin_table)
    truncated, same = pairs.count_cut(encoder)
    ds = pipeline.sharded_shuffled(pairs, seed, shard, num_epochs, shuffle=shuffle)
    ds = ds.map(encoder).to_iter_dataset()
    return pipeline.Batches(pipeline.finish(ds, batch_size, prefetch, drop_remainder), rows_per_epoch=len(pairs),
                            description={"source": ",".join(pairs.files), "pairs": len(pairs), "dropped": pairs.dropped,
                             "rated": pairs.rated, "safety_labelled": pairs.safety_labelled, "margin": margin_table,
                             **({"unread_fields": pairs.unread_fields()} if pairs.unread else {}),
                             **({"identical_pairs": f"{len(pairs.identical)} (first: {pairs.identical[0]})"}
                                if pairs.identical else {}),
                             **({"empty_chosen": f"{len(pairs.empty_chosen)} (first: {pairs.empty_chosen[0]})"}
                                if pairs.empty_chosen else {}),
                             **({"empty_rejected": f"{len(pairs.empty_rejected)} (first: {pairs.empty_rejected[0]})"}
                                if pairs.empty_rejected else {}),
                             **({"truncated": f"{truncated:,} (longer than seq_len {seq_len}: the prompt's first "
                                              "tokens go, the same on both sides; an answer still too long "
                                              "loses its end)"} if truncated else {}),
                             **({"same_once_cut": f"{len(same):,} (both sides' {seq_len} tokens once cut are the same: "
                                                 f"no signal, scored as wrong; first: {same[0]})"} if same else {})})
