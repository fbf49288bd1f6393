"""Random-access document sources for Grain: text files, JSONL, pre-tokenized ArrayRecord
shards, and the embedded default corpus (the running interpreter's standard library).

Every source validates its input when it is opened, so a malformed line is one
`DataError` naming the file and line before training starts, not a crash mid-run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
import threading
from array import array
from typing import Any, Callable, Sequence

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the problem."""


def expand_globs(patterns: str | Sequence[str], what: str = "input") -> list[str]:
    """Sorted files matching one or more globs (comma-separated in a string)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    def matches(p: str) -> list[str]:
        p = os.path.expanduser(p.strip())
        if os.path.isfile(p):  # a file's own name, even with glob characters in it (run[1].txt)
            return [p]
        return [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]

    found = {p: matches(p) for p in patterns}
    missing = [p for p, fs in found.items() if not fs]
    hint = " (a weight, @WEIGHT, goes at the end of a pretraining source, KIND:GLOB,GLOB@WEIGHT, or of a " \
        "preference glob; other data takes none)" \
        if any("@" in p for p in missing) \
        else " (a KIND: prefix, as in jsonl:GLOB, names the kind of a pretraining data.source; fine-tuning " \
        "stages take globs alone)" \
        if any(p.strip().split(":", 1)[0] in ("jsonl", "text", "shards") for p in missing) \
        else f" ({missing[0].strip()} is a directory: name its files, e.g. {os.path.join(missing[0].strip(), '*')}, " \
        f"or {os.path.join(missing[0].strip(), '**', '*')} for all below it)" \
        if missing and os.path.isdir(os.path.expanduser(missing[0].strip())) else ""
    if not any(found.values()):
        raise DataError(f"no {what} files match {list(patterns)}{hint}")
    if missing:  # a typo in one part of a list would drop its data without a word
        raise DataError(f"no {what} files match {missing[0]!r}, one of {list(patterns)}{hint}")
    files = sorted({f for fs in found.values() for f in fs})
    for f in files:  # every input read through here is text: a compressed file would train on its bytes (U+FFFD)
        with open(f, "rb") as fh:
            head = fh.read(6)
        packed = next((name for name, magic in COMPRESSED if head.startswith(magic)
                       and (name != "bzip2" or head[3:4] in b"123456789")), None)
        if packed:
            raise DataError(f"{f}: {packed}-compressed; {what} files are read as plain text (decompress it first, "
                            f"e.g. {'gunzip' if packed == 'gzip' else packed + ' -d'} {f})")
        wide = next((name for name, magic in WIDE_BOMS if head.startswith(magic)), None)
        if wide:  # read as UTF-8, every other byte would be a NUL: noise that trains
            raise DataError(f"{f}: {wide} text (its byte-order mark says so); {what} files are read as UTF-8 "
                            f"(convert it first, e.g. iconv -f {wide} -t UTF-8 {f} > {f}.utf8)")
    return files


def split_fraction(item: str, spec: str) -> tuple[str, float]:
    """`PATH@FRACTION` -> (PATH, FRACTION); no `@`, or an `@` inside a path -> (item, 1.0).
    `spec` (the whole mixture) is named in the error for a bad fraction."""
    if "@" not in item:
        return item, 1.0
    path, _, frac = item.rpartition("@")
    try:
        fraction = float(frac)
    except ValueError:
        if "/" in frac or any(os.path.exists(os.path.expanduser(p)) for p in (item, item.split(":", 1)[-1])):
            return item, 1.0
        raise DataError(f"data mixture {spec!r}: {frac!r} is not a number (use GLOB@0.5)") from None
    if not 0 < fraction < 1e6:  # NaN and infinity too
        raise DataError(f"data mixture {spec!r}: fraction {frac} must be > 0 and finite (below 1e6)")
    return path, fraction


def share(n: int, fraction: float, rng: np.random.Generator, what: str, spec: str, unit: str) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of n items (`unit`s of source `what` in mixture
    `spec`): below 1 a subset, above 1 every item int(fraction) times plus a subset for the
    rest. A share that rounds to no item is an error."""
    k = int(round(fraction * n))
    if n and k == 0:
        raise DataError(f"data mixture {spec!r}: {what}@{fraction:g} takes no {unit} of its {n} (a larger fraction, "
                        "or leave it out)")
    if fraction <= 1:
        return np.sort(rng.permutation(n)[:k])
    whole = int(fraction)
    return np.sort(np.concatenate([np.tile(np.arange(n), whole), rng.permutation(n)[:k - whole * n]]))


# the magic numbers of compressed files: read as text, their bytes would become U+FFFD noise
COMPRESSED = (("gzip", b"\x1f\x8b"), ("bzip2", b"BZh"), ("xz", b"\xfd7zXZ\x00"), ("zstd", b"\x28\xb5\x2f\xfd"),
              ("zip", b"PK\x03\x04"))


# byte-order marks of text that is not UTF-8 (UTF-32's before UTF-16's, whose marks begin theirs)
WIDE_BOMS = (("UTF-32LE", b"\xff\xfe\x00\x00"), ("UTF-32BE", b"\x00\x00\xfe\xff"), ("UTF-16LE", b"\xff\xfe"),
             ("UTF-16BE", b"\xfe\xff"))


class TextFiles:
    """Each file is one document (its whole text); empty files are left out (`empty`
    counts them), a source of nothing else is an error. Bytes that are not UTF-8 are read
    as U+FFFD; `not_utf8` lists the files read so far that had some."""

    def __init__(self, patterns: str | Sequence[str]):
        found = expand_globs(patterns, "text")
        self.files = [f for f in found if os.path.getsize(f) > 0]
        self.empty = len(found) - len(self.files)
        if not self.files:
            raise DataError(f"every text file matching {patterns!r} is empty ({len(found)} files)")
        self.not_utf8: list[str] = []  # each file once, in the order first read
        self._lock = threading.Lock()  # the pipeline reads ahead on threads

    def __len__(self) -> int:
        return len(self.files)

    def nbytes(self, i: int) -> int:
        """The bytes document i takes on disk (progress over a corpus of uneven files)."""
        return os.path.getsize(self.files[i])

    def __getitem__(self, i: int) -> str:
        # read when the pipeline reaches it (a corpus is not read at start): bytes that are not UTF-8 become
        # U+FFFD rather than end a run hours in; a byte-order mark is not text; line ends become \n (\r\n, \r),
        # as text mode reads them
        with open(self.files[i], "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            with self._lock:
                if not self.not_utf8:  # said once (a run reads on; prepare lists them all in its metadata)
                    print(f"warning: {self.files[i]}: bytes that are not UTF-8 ({e.reason} at byte {e.start}), read "
                          "as U+FFFD; text files are read as UTF-8 (this is said for the first such file only)",
                          file=sys.stderr, flush=True)
                if self.files[i] not in self.not_utf8:
                    self.not_utf8.append(self.files[i])
            text = raw.decode("utf-8-sig", errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")


BAD_LINES_SHOWN = 10  # a JSONL file's bad lines named in its one error (the first one's message in full)


class Jsonl:
    """One JSON object per line, random access by line. `validate(record, where)`
    checks each record when the file is opened (and may raise DataError); `convert`
    turns a record into the element the pipeline consumes."""

    def __init__(self, patterns: str | Sequence[str], validate: Callable[[dict, str], None] | None = None,
                 convert: Callable[[dict], Any] | None = None):
        self.files = expand_globs(patterns, "JSONL")
        self.convert = convert
        # (file number, byte offset, line number) of each record, as machine integers (20 bytes a line where a
        # list of tuples took about 200: a pod-scale file of short lines held gigabytes of index)
        self._file, self._offset, self._line = array("i"), array("q"), array("q")
        bad: list[DataError] = []  # the first few bad lines, reported together: a large file is fixed in one go
        for fi, path in enumerate(self.files):
            start = len(self._file)
            with open(path, "rb") as fh:
                offset = 0
                for lineno, raw in enumerate(fh, 1):
                    if raw.strip():
                        try:
                            record = self._parse(raw, path, lineno)
                            if validate is not None:
                                validate(record, f"{path}:{lineno}")
                        except DataError as e:
                            bad.append(e)
                            if len(bad) == BAD_LINES_SHOWN:
                                break
                        self._file.append(fi)
                        self._offset.append(offset)
                        self._line.append(lineno)
                    offset += len(raw)
            if len(bad) == BAD_LINES_SHOWN:
                break
            if len(self._file) == start:
                raise DataError(f"{path}: empty file (no JSON lines)")
        if bad:
            more = [str(e).split(": ", 1)[0] for e in bad[1:]]
            raise DataError(str(bad[0]) + (f" (and {'at least ' * (len(bad) == BAD_LINES_SHOWN)}{len(more)} more "
                                           f"bad line{'s' * (len(more) > 1)}: {', '.join(more)})" if more else ""))

    @staticmethod
    def _parse(raw: bytes, path: str, lineno: int) -> dict:
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e}); JSONL files are UTF-8") from None
        except json.JSONDecodeError as e:
            head = raw.strip()[:1]
            hint = "" if head in (b"{", b'"') else "; a JSONL file holds one JSON object a line" + (
                ", and this looks like one JSON array (write each of its objects on a line of its own)"
                if head == b"[" else "")
            # the decoder's position within this one line (its "line 2" is the line's own newline)
            col = e.colno if e.lineno == 1 else len(raw.rstrip(b"\r\n").decode("utf-8", "replace")) + 1
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {col}){hint}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}" + (
                "; a JSONL file holds one JSON object a line, and this line is one JSON array (write each of its "
                "objects on a line of its own)" if isinstance(record, list) else ""))
        return record

    def where(self, i: int) -> str:
        return f"{self.files[self._file[i]]}:{self._line[i]}"

    def record(self, i: int) -> dict:
        path = self.files[self._file[i]]
        with open(path, "rb") as fh:
            fh.seek(self._offset[i])
            return self._parse(fh.readline(), path, self._line[i])

    def __len__(self) -> int:
        return len(self._file)

    def nbytes(self, i: int) -> int:
        """The bytes line i takes in its file, up to the next record's (blank lines included)."""
        fi = self._file[i]
        end = self._offset[i + 1] if i + 1 < len(self._file) and self._file[i + 1] == fi \
            else os.path.getsize(self.files[fi])
        return end - self._offset[i]

    def __getitem__(self, i: int):
        rec = self.record(i)
        return rec if self.convert is None else self.convert(rec)


def require(record: dict, where: str, field: str, kind: type | tuple[type, ...]) -> Any:
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {field!r} must be {names}, got {type(value).__name__}")
    return value


def text_jsonl(patterns) -> Jsonl:
    """JSONL with a `text` field per line."""
    def validate(record, where):
        if "text" not in record and ("messages" in record or "prompt" in record):
            raise DataError(f"{where}: missing field 'text': this reads documents ({{\"text\": ...}} a line), and "
                            f"this line is a {'dialog' if 'messages' in record else 'preference pair'}; for a "
                            "chat model's loss on dialogs, train or evaluate its stage (SFT's held-out eval_loss "
                            "scores the answers)")
        require(record, where, "text", str)

    return Jsonl(patterns, validate=validate, convert=lambda r: r["text"])


class TokenShards:
    """Pre-tokenized documents in ArrayRecord shards written by `llama_jax.data.prepare`
    (each record: little-endian int32 token ids, BOS/EOS included)."""

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, "metadata.json")
        if not os.path.exists(meta_path):
            raise DataError(f"{meta_path}: missing (write shards with python -m llama_jax.data.prepare)")
        try:
            with open(meta_path) as f:
                self.metadata = json.load(f)
            shards = self.metadata["shards"]
            if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
                raise TypeError
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: invalid JSON ({e})") from None
        except (KeyError, TypeError):
            raise DataError(f"{meta_path}: needs a \"shards\" list of file names (as llama_jax.data.prepare "
                            "writes)") from None
        from grain.sources import ArrayRecordDataSource

        paths = [os.path.join(directory, s) for s in shards]
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"{p}: shard listed in {meta_path} is missing")
        self.source = ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self.source[i], dtype="<i4").astype(np.int32)


# ----------------------------------------------------------------------------------
# The embedded default corpus
# ----------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
              "encodings"}  # encodings: machine-generated codec tables, not prose or code


def _held_out(name: str, eval_percent: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100 < eval_percent


class StdlibCorpus:
    """The running interpreter's standard library: its `.py` sources (tests excluded)
    and the `pydoc_data` help topics. Sorted, so the same interpreter always gives the
    same documents; a fixed 2% of them (by a hash of their name) is the held-out split."""

    def __init__(self, split: str = "train", eval_percent: int = 2):
        if split not in ("train", "eval"):
            raise DataError(f"stdlib corpus split must be 'train' or 'eval', got {split!r}")
        root = sysconfig.get_paths()["stdlib"]
        docs: list[tuple[str, str]] = []  # (name, kind: file path or "topic")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for fn in sorted(filenames):
                if fn.endswith(".py"):
                    path = os.path.join(dirpath, fn)
                    docs.append((os.path.relpath(path, root), path))
        from pydoc_data.topics import topics

        docs += [(f"pydoc:{k}", "topic") for k in sorted(topics)]
        self.docs = [d for d in docs if _held_out(d[0], eval_percent) == (split == "eval")]
        self.split = split
        self.identity = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        name, path = self.docs[i]
        if path == "topic":
            from pydoc_data.topics import topics

            return topics[name[len("pydoc:"):]]
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
