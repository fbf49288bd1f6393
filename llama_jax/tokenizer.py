"""SentencePiece tokenizer with Llama 2's trainer settings, and the Llama 2-Chat format.

    python -m llama_jax.tokenizer train --input='corpus/*.txt' --vocab_size=8000 --output=tok.model
    python -m llama_jax.tokenizer encode --model=tok.model --text='Hello world'

Special ids follow Llama 2: unk=0 `<unk>`, BOS=1 `<s>`, EOS=2 `</s>`, and no pad token
(pad_id=-1): padding is explicit, with masks / segment ids.

The chat format is exactly Meta's `llama/generation.py` `chat_completion`:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {answer_1} </s><s>[INST] {user_2} [/INST]

Each completed (user, answer) pair is encoded on its own as
`encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)`, the open
final user turn as `encode(f"[INST] {user.strip()} [/INST]", bos=True, eos=False)`; the
tags are plain text, not special ids.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
from typing import Iterable, Sequence

import sentencepiece as spm

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1

# Llama 2's SentencePiece trainer settings (the fields of Meta's tokenizer.model proto).
LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    max_sentencepiece_length=16,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    max_sentence_length=4192,
    shrinking_factor=0.75,
    num_sub_iterations=2,
    seed_sentencepiece_size=1_000_000,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    use_all_vocab=False,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=PAD_ID,
)


def first_tag(text: str) -> tuple[int, str] | None:
    """(index, tag) of the first tag of the chat format in `text`; None if it has none."""
    hits = [(text.find(tag), tag) for tag in SPECIAL_TAGS if tag in text]
    return min(hits) if hits else None


class DialogError(ValueError):
    """A dialog that the Llama 2-Chat format cannot encode; the message says why."""


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded or trained; the message names the file."""


class Tokenizer:
    """A loaded SentencePiece model (a real Llama 2 `tokenizer.model` or one trained by
    `train`)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise TokenizerError(f"{model_path}: tokenizer model not found")
        self.path = model_path
        with open(model_path, "rb") as f:
            self._blob = f.read()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._blob)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id(), -1
        if (self.unk_id, self.bos_id, self.eos_id) != (UNK_ID, BOS_ID, EOS_ID):
            raise TokenizerError(f"{model_path}: special ids unk/bos/eos = {self.unk_id}/{self.bos_id}/"
                                 f"{self.eos_id}, Llama 2 needs {UNK_ID}/{BOS_ID}/{EOS_ID}")

    def __getstate__(self):  # picklable, for multi-process input pipelines
        return {"path": self.path, "blob": self._blob}

    def __setstate__(self, state):
        self.path, self._blob = state["path"], state["blob"]
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self._blob)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = BOS_ID, EOS_ID, UNK_ID, PAD_ID

    # -- identity (stored with every checkpoint) --------------------------------------
    def identity(self) -> dict:
        return {"sha256": hashlib.sha256(self._blob).hexdigest(), "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def trainer_settings(self) -> dict:
        """The settings the model was trained with (its proto's trainer and normalizer specs)."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self._blob)
        spec, norm = proto.trainer_spec, proto.normalizer_spec
        return {"model_type": pb.TrainerSpec.ModelType.Name(spec.model_type).lower(),
                "normalization_rule_name": norm.name, "add_dummy_prefix": norm.add_dummy_prefix,
                "remove_extra_whitespaces": norm.remove_extra_whitespaces,
                **{k: getattr(spec, k) for k in LLAMA2_TRAINER_SETTINGS
                   if k not in ("model_type", "normalization_rule_name", "add_dummy_prefix",
                                "remove_extra_whitespaces")}}

    def llama_differences(self, settings: dict | None = None) -> list[str]:
        """The trainer settings in which this model differs from Llama 2's (`settings`: its
        `trainer_settings()`, when already read)."""
        settings = settings or self.trainer_settings()
        return [k for k, v in LLAMA2_TRAINER_SETTINGS.items()
                if k in settings and (abs(settings[k] - v) > 1e-6 if isinstance(v, float) else settings[k] != v)]

    def describe(self, pieces: int = 0) -> str:
        """Lines for `tokenizer info`: identity, trainer settings (and where they differ
        from Llama 2's), and the first `pieces` pieces."""
        settings = self.trainer_settings()
        differ = self.llama_differences(settings)
        lines = [f"{self.path}: vocab {self.vocab_size}, sha256 {self.identity()['sha256']}",
                 f"special ids: unk {self.unk_id}, bos {self.bos_id}, eos {self.eos_id}, pad {self.sp.pad_id()} (none)",
                 "trainer: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
                 "Llama 2's trainer settings" + (f", except {', '.join(differ)}" if differ else ": all")]
        if pieces:
            lines.append("pieces: " + " ".join(f"{i}:{self.sp.id_to_piece(i)}"
                                               for i in range(min(pieces, self.vocab_size))))
        return "\n".join(lines)

    @classmethod
    def of_checkpoint(cls, checkpoint: str, path: str | None, model_vocab_size: int) -> Tokenizer:
        """The tokenizer saved beside a checkpoint (`path`, None if there is none),
        checked to fit the checkpoint's model."""
        if path is None:
            raise TokenizerError(f"{checkpoint}: no tokenizer.model beside the checkpoint")
        tok = cls(path)
        tok.check_fits(model_vocab_size, "checkpoint")
        return tok

    def check_fits(self, model_vocab_size: int, source: str = "model") -> None:
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(f"{self.path}: tokenizer vocabulary {self.vocab_size} is larger than the "
                                 f"{source} vocab_size {model_vocab_size}")

    # -- plain text --------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):  # SentencePiece encodes a list as a batch: a list of lists, silently
            raise TypeError(f"Tokenizer.encode: text must be a str, got {type(text).__name__} (encode a list one "
                            "text at a time)")
        try:
            ids = self.sp.encode(text)
        except RuntimeError:  # lone surrogates (a JSON "\ud800"), which SentencePiece cannot take
            ids = self.sp.encode(valid_unicode(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def answer(self, ids: Sequence[int]) -> tuple[str, int]:
        """A sampled answer's text (EOS dropped, stripped) and how many of its tokens that
        text is made of: all of them, EOS included, unless the model wrote a tag of the
        chat format. Its turn ends there (as in `chat`): the text stops before the tag and
        is the longest run of first tokens that decodes within it (fewer tokens than given:
        the answer was cut). A tag in a message would make every dialog it joins invalid."""
        ids = [int(t) for t in ids]
        body = [t for t in ids if t != self.eos_id]
        text = self.decode(body).strip()
        hit = first_tag(text)
        if hit is None:
            return text, len(ids)
        head, n = text[:hit[0]].rstrip(), 0
        for m in range(1, len(body) + 1):  # a character of several byte pieces decodes as U+FFFD until
            prefix = self.decode(body[:m]).strip()  # its last one: the longest prefix within `head` counts
            if head.startswith(prefix):
                n = m
            elif first_tag(prefix) is not None:
                break
        return self.decode(body[:n]).strip(), n

    def _pieces(self, text: str):
        """Pieces with their UTF-8 byte offsets (`id`, `begin`, `end`)."""
        try:
            return self.sp.encode(text, return_type="proto").pieces  # sentencepiece >= 0.2.1
        except TypeError:
            return self.sp.encode(text, out_type="immutable_proto").pieces

    # -- Llama 2-Chat --------------------------------------------------------------------
    def encode_dialog(self, messages: Sequence[dict]) -> list[int]:
        """Prompt tokens for generation: the dialog must end with a user message."""
        turns = _turns(messages, last="user")
        tokens: list[int] = []
        for user, answer in turns[:-1]:
            tokens += self.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
        tokens += self.encode(f"{B_INST} {turns[-1][0].strip()} {E_INST}", bos=True, eos=False)
        return tokens

    def encode_dialog_for_training(self, messages: Sequence[dict], last_turn_only: bool = False
                                   ) -> tuple[list[int], list[bool]]:
        """(tokens, loss_mask) of a dialog ending with an assistant message. Tokens equal
        Meta's encoding of the completed turns; the mask is True exactly on the answer
        tokens (with the trailing-space piece) and each turn's EOS. `last_turn_only`
        (Ghost Attention) trains only the final answer."""
        turns = _turns(messages, last="assistant")
        tokens: list[int] = []
        mask: list[bool] = []
        for i, (user, answer) in enumerate(turns):
            prompt = f"{B_INST} {user.strip()} {E_INST}"
            text = f"{prompt} {answer.strip()} "
            pieces = self._pieces(text)
            trained = not last_turn_only or i == len(turns) - 1
            # A piece belongs to the answer if it starts after the prompt (the space that
            # opens the answer is SentencePiece's "▁" on the answer's first piece).
            # Offsets are in UTF-8 bytes.
            answer_start = len(prompt.encode("utf-8"))
            tokens += [self.bos_id] + [p.id for p in pieces] + [self.eos_id]
            mask += [False] + [trained and p.begin >= answer_start for p in pieces] + [trained]
        return tokens, mask


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD. Python reads bytes that are not
    UTF-8 from argv, a terminal or a pipe as such surrogates (surrogateescape), which no
    tokenizer can encode: each such byte becomes one U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _turns(messages: Sequence[dict], last: str) -> list[tuple[str, str | None]]:
    """Validates a dialog and folds the system message into the first user turn.
    Returns [(user, answer), ...]; the last answer is None when `last == "user"`."""
    if isinstance(messages, dict):  # one message, or a {"messages": [...]} record
        raise DialogError("a dialog is a list of messages ({'role': ..., 'content': ...}), not one dict"
                          + (": pass record['messages']" if "messages" in messages else ""))
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DialogError("empty dialog: need at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DialogError(f"message {i}: must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DialogError(f"message {i}: unknown role {m['role']!r}; roles are {ROLES}")
        if not isinstance(m["content"], str):
            raise DialogError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: from a JSON escape, or bytes that were not UTF-8
            raise DialogError(f"message {i}: content is not valid Unicode ({e.reason} at character {e.start})") \
                from None
        for tag in SPECIAL_TAGS:
            if tag in m["content"]:
                raise DialogError(f"message {i}: special tag {tag!r} is not allowed inside a message")
    msgs = list(messages)
    if msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise DialogError("a system message must be followed by a user message")
        msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
        offset = 1
    else:
        offset = 0
    for j, m in enumerate(msgs):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise DialogError(f"message {j + offset}: expected role {want!r} (roles must alternate user/assistant"
                              f" after an optional first system message), got {m['role']!r}")
    if msgs[-1]["role"] != last:
        raise DialogError(f"the last message must be from the {last}, got {msgs[-1]['role']!r}")
    users = [m["content"] for m in msgs[0::2]]
    answers = [m["content"] for m in msgs[1::2]]
    return list(zip(users, answers + [None] * (len(users) - len(answers))))


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


SENTENCE_BYTES = LLAMA2_TRAINER_SETTINGS["max_sentence_length"]  # SentencePiece skips longer lines
LINE_CHARS = 1000  # the line length training text is written in: under SENTENCE_BYTES in any script
CLI_TEXT_BUDGET = 200_000_000  # characters `tokenizer train` learns from by default (SentencePiece then samples
# input_sentence_size lines of them)


def _check_train_args(vocab_size: int, output: str) -> None:
    if not output.endswith(".model"):
        raise TokenizerError(f"{output}: the output path must end in .model")
    min_vocab = 3 + 256 + 1  # specials + byte-fallback pieces + at least one merge
    if vocab_size < min_vocab:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: byte fallback alone needs {min_vocab}")


def train(inputs: Sequence[str], vocab_size: int, output: str, *, input_sentence_size: int = 2_000_000,
          num_threads: int | None = None) -> Tokenizer:
    """Trains a BPE model with Llama 2's settings on text files; writes `output` (a
    `.model` path) and returns it loaded. A file with lines SentencePiece would skip
    (over SENTENCE_BYTES) or Windows line ends is given to it as a copy in lines of at
    most LINE_CHARS characters and `\n` line ends."""
    import re
    import tempfile

    files = sorted({f for pattern in inputs for f in ([pattern] if os.path.isfile(pattern) else
                                                    glob.glob(pattern, recursive=True)) if os.path.isfile(f)})
    if not files:
        raise TokenizerError(f"no input files match {list(inputs)}")
    _check_train_args(vocab_size, output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    prefix = output[: -len(".model")]
    with tempfile.TemporaryDirectory() as d:
        files = [_sentencepiece_ready(f, os.path.join(d, f"{n}.txt")) for n, f in enumerate(files)]
        try:
            spm.SentencePieceTrainer.train(
                input=files, model_prefix=prefix, vocab_size=vocab_size, input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2, **LLAMA2_TRAINER_SETTINGS)
        except RuntimeError as e:
            few = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
            if few:  # SentencePiece's own message names a flag this CLI does not have
                raise TokenizerError(f"vocab_size {vocab_size} is too small for this text: its characters (Llama 2's "
                                     f"character_coverage {LLAMA2_TRAINER_SETTINGS['character_coverage']}) need "
                                     f"{few.group(1)} pieces before any merge; use a larger vocab_size") from None
            many = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
            if many:
                raise TokenizerError(f"vocab_size {vocab_size} is more pieces than this text yields (at most "
                                     f"{many.group(1)}); use a smaller vocab_size or more text") from None
            if "sentences_.empty()" in str(e):
                raise TokenizerError(f"no text to train on in {len(files)} file(s): every line is empty") from None
            raise TokenizerError(f"training on {len(files)} file(s) failed: {e}") from None
    _forget_paths(output)
    return Tokenizer(output)


def _forget_paths(path: str) -> None:
    """Drops the input and output paths SentencePiece records in the model's trainer
    settings (temporary files, for a run's tokenizer): the same text then gives the same
    file, and the same sha256, wherever it was trained."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def _sentencepiece_ready(path: str, copy: str) -> str:
    """`path`, or `copy` written with its lines split to LINE_CHARS characters, universal
    line ends and no byte-order mark, when SentencePiece would skip some of its lines or
    learn `\r` (streamed: a corpus file is never read whole)."""
    with open(path, "rb") as f:
        bom = f.read(3) == b"\xef\xbb\xbf"
        f.seek(0)
        if not bom and not any(len(line) > SENTENCE_BYTES or b"\r" in line for line in f):
            return path
    with open(path, encoding="utf-8-sig", errors="replace") as f, open(copy, "w", encoding="utf-8") as out:
        for line in f:
            line = line.rstrip("\n")
            out.writelines(piece + "\n" for piece in _line_pieces(line))
    return copy


def _line_pieces(line: str) -> list[str]:
    """A line cut into pieces of at most LINE_CHARS characters (an empty line stays one)."""
    return [line[j:j + LINE_CHARS] for j in range(0, len(line), LINE_CHARS)] or [""]


def write_training_text(docs, order, path: str, budget: float = float("inf"), progress=None) -> bool:
    """Writes the documents `docs[i]` for i in `order` to `path`, SentencePiece's input,
    up to `budget` characters; whether all of them fitted. Lines over LINE_CHARS
    characters are split: SentencePiece skips lines over 4,192 bytes (Llama 2's
    max_sentence_length), so a document of one long line would teach it nothing.
    `progress(documents written, characters)` is called after each document."""
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for n, i in enumerate(order, 1):
            text = docs[int(i)]
            over = len(text) > budget - size
            if over:  # the budget is a bound: the document that crosses it is cut there
                text = text[:int(budget - size)]
            size += len(text)
            lines = text.split("\n")
            if any(len(line) > LINE_CHARS for line in lines):
                text = "\n".join(piece for line in lines for piece in _line_pieces(line))
            f.write(text + "\n")
            if progress is not None:
                progress(n, size)
            if over:
                return False
    return True


def sample_training_text(docs, path: str, budget: float, seed: int, progress=None) -> bool:
    """`write_training_text` of every document when they fit in `budget` characters;
    else (returns False) of documents drawn with `seed` from all of them, not the first
    in order (a corpus's first files by name could all be of one kind)."""
    import numpy as np

    if write_training_text(docs, range(len(docs)), path, budget, progress):
        return True
    write_training_text(docs, np.random.default_rng(seed).permutation(len(docs)), path, budget, progress)
    return False


class _Documents:
    """Several document sources read as one."""

    def __init__(self, parts):
        import itertools

        self.parts = parts
        self.ends = list(itertools.accumulate(len(p) for p in parts))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i: int) -> str:
        import bisect

        k = bisect.bisect_right(self.ends, i)
        return self.parts[k][i - (self.ends[k - 1] if k else 0)]


def _train_from_sources(inputs: Sequence[str], vocab_size: int, output: str, max_characters: int = CLI_TEXT_BUDGET,
                        seed: int = 0, **kw) -> Tokenizer:
    """`train` on `inputs`, each a source as the pipelines name it, comma-separated globs
    each of which must match a file: text files (`GLOB` or `text:GLOB`) go to SentencePiece
    as they are (it samples `input_sentence_size` lines of all of them; lines it would skip
    or Windows line ends are fixed in a streamed copy, see `train`); `jsonl:GLOB` records'
    `text` fields are written as a run's own tokenizer's text is, up to `max_characters`
    (documents drawn from all of them with `seed` when they are more)."""
    import tempfile

    from llama_jax.data.sources import DataError, expand_globs, text_jsonl
    from llama_jax.metrics import Progress

    _check_train_args(vocab_size, output)  # before reading a corpus
    files, parts = [], []
    try:
        for spec in inputs:
            if spec.startswith("jsonl:"):
                parts.append(text_jsonl(spec[len("jsonl:"):]))
                continue
            found = expand_globs(spec[len("text:"):] if spec.startswith("text:") else spec, "text")
            if any(f.endswith(".jsonl") for f in found):
                pattern = spec[len("text:"):] if spec.startswith("text:") else spec
                print(f"note: {pattern}: .jsonl files are read as plain text (JSON syntax included); "
                      f"jsonl:{pattern} reads their text field", file=sys.stderr)
            files += found
    except DataError as e:
        raise TokenizerError(str(e)) from None
    with tempfile.TemporaryDirectory() as d:
        said = [f"{len(files):,} text files (SentencePiece samples {kw.get('input_sentence_size', 2_000_000):,} "
                "lines of them)"] if files else []
        if parts:
            docs = _Documents(parts)
            text = os.path.join(d, "jsonl.txt")
            progress = Progress(len(docs), what="JSONL documents read", throttle=True, delay=2.0)
            chars = [0]
            everything = sample_training_text(docs, text, max_characters, seed,
                                              lambda n, size: chars.__setitem__(0, size) or progress.update(n))
            progress.close()
            files.append(text)
            said.append(f"{chars[0]:,} characters of " + (
                f"all {len(docs):,} JSONL documents" if everything else
                f"JSONL documents drawn (seed {seed}) from all {len(docs):,}: --max_characters {max_characters:,}"))
        print(f"training a {vocab_size}-piece tokenizer on {' and '.join(said)}; SentencePiece shows no progress",
              file=sys.stderr, flush=True)
        return train(files, vocab_size, output, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama_jax.tokenizer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer with Llama 2's settings")
    t.add_argument("--input", action="append", required=True,
                   help="text files (GLOB or text:GLOB, one document each) or jsonl:GLOB (the records' `text` "
                   "field); comma-separated globs, each of which must match a file; repeatable")
    t.add_argument("--vocab_size", type=int, required=True)
    t.add_argument("--output", required=True, help="PATH.model")
    t.add_argument("--max_characters", type=int, default=CLI_TEXT_BUDGET,
                   help="jsonl: inputs: at most this many characters of their documents, every one when they fit, "
                   "else documents drawn from all of them (--seed); text files go to SentencePiece whole")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--input_sentence_size", type=int, default=2_000_000,
                   help="lines SentencePiece samples from that text")
    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("--model", required=True)
    e.add_argument("--text", required=True)
    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--model", required=True)
    d.add_argument("--ids", required=True, help="ids separated by commas or spaces ('[1, 450]' works too)")
    i = sub.add_parser("info", help="print a model's vocabulary size, identity and trainer settings")
    i.add_argument("--model", required=True)
    i.add_argument("--pieces", type=int, default=0, help="also list its first N pieces")
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.tokenizer")
    for flag in ("max_characters", "input_sentence_size"):
        if getattr(args, flag, 1) < 1:
            ap.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    try:
        if args.cmd == "train":
            tok = _train_from_sources(args.input, args.vocab_size, args.output, args.max_characters, args.seed,
                                      input_sentence_size=args.input_sentence_size)
            print(f"wrote {args.output}: vocab {tok.vocab_size}, sha256 {tok.identity()['sha256'][:16]}")
        elif args.cmd == "encode":
            tok = Tokenizer(args.model)
            ids = tok.encode(valid_unicode(args.text), bos=True)
            print(ids)
            print([tok.sp.id_to_piece(i) for i in ids])
        elif args.cmd == "decode":
            tok = Tokenizer(args.model)
            try:
                ids = [int(t) for t in args.ids.replace(",", " ").strip("[] ").split()]
            except ValueError:
                ap.error(f"--ids: not whole numbers: {args.ids!r}")
            outside = [t for t in ids if not 0 <= t < tok.vocab_size]
            if outside:
                raise TokenizerError(f"{args.model}: ids {outside[:5]} are outside its vocabulary of "
                                     f"{tok.vocab_size}")
            print(tok.decode(ids))
        else:
            print(Tokenizer(args.model).describe(args.pieces))
    except (TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
