"""Pre-tokenize a corpus into ArrayRecord shards for pod-scale pretraining.

    python -m llama_jax.data.prepare --source='jsonl:/data/*.jsonl' --tokenizer=tok.model \\
        --output=/data/shards --num_shards=64

Each record is one document's token ids (little-endian int32, BOS and EOS included);
`metadata.json` lists the shards, the document and token counts and the tokenizer's
identity, which the pipeline checks against the run's tokenizer. Read them back with
`--config.data.source=shards:/data/shards`. Shards are written to temporary names and
renamed when complete, metadata last, so an interrupted run never leaves a directory
that looks finished: a failure removes the shard files it wrote (and an --output it
made), and the rerun after a kill removes those it left. Progress (MB of one unweighted
text or JSONL source, else documents; tokens, tokens/s, ETA) is shown on stderr; empty text
files left out and files with bytes that are not UTF-8 are said and recorded in
metadata.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np


def prepare(source: str, tokenizer, output: str, num_shards: int = 8) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    from llama_jax.data.pretrain import open_documents, source_kinds
    from llama_jax.metrics import Progress

    if "shards" in source_kinds(source):
        raise ValueError(f"--source {source}: already prepared shards (use them as data.source directly)")
    docs = open_documents(source)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    made = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    if os.path.exists(os.path.join(output, "metadata.json")):
        raise FileExistsError(f"{output}: already holds prepared shards (metadata.json); choose another --output")
    stale = sorted(f for f in os.listdir(output) if re.fullmatch(r"tokens-\d{5}-of-\d{5}\.array_record(\.tmp)?", f))
    if stale:  # no metadata.json: an interrupted run's shards, which would sit beside these unlisted
        print(f"removing {len(stale)} shard files of an interrupted run from {output}", file=sys.stderr)
        for f in stale:
            os.remove(os.path.join(output, f))
    names = [f"tokens-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    writers = []
    try:
        for n in names:
            writers.append(ArrayRecordWriter(os.path.join(output, n + ".tmp"), "group_size:1"))
        n_tokens = _write(docs, tokenizer, writers, Progress)
        for w, n in zip(writers, names):
            w.close()
            os.replace(os.path.join(output, n + ".tmp"), os.path.join(output, n))
        meta = {"source": source, "documents": len(docs), "tokens": n_tokens, "shards": names,
                "tokenizer": tokenizer.identity()}
        for part in getattr(docs, "parts", [docs]):  # what a text source left out or read as U+FFFD
            part = getattr(part, "source", part)  # (a weighted share of one)
            if getattr(part, "empty", 0):
                meta["empty_files"] = meta.get("empty_files", 0) + part.empty
            if getattr(part, "not_utf8", None):
                meta.setdefault("not_utf8_files", []).extend(part.not_utf8)
        with open(os.path.join(output, "metadata.json.tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(output, "metadata.json.tmp"), os.path.join(output, "metadata.json"))
    except BaseException:  # a failure (a file gone, a full disk) or Ctrl-C: nothing half-written is left
        for w, n in zip(writers, names):
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing a writer whose disk is full may fail too
                pass
        for f in [f"{n}{tmp}" for n in names for tmp in (".tmp", "")] + ["metadata.json.tmp"]:
            if os.path.exists(os.path.join(output, f)):
                os.remove(os.path.join(output, f))
        if made and not os.listdir(output):
            os.rmdir(output)
        raise
    return meta


def _write(docs, tokenizer, writers, Progress) -> int:
    """Tokenizes every document into the shard writers in turn; the number of tokens.
    Progress in MB of the source where its files are known (documents vary in size), else
    in documents."""
    sized = hasattr(docs, "nbytes")
    total = sum(docs.nbytes(i) for i in range(len(docs))) if sized else len(docs)
    progress = Progress(total or None, what="MB" if sized else "documents", throttle=True, scale=1e6 if sized else 0)
    n_tokens, done, t0 = 0, 0, time.time()
    for i in range(len(docs)):
        tokens = np.asarray(tokenizer.encode(docs[i], bos=True, eos=True), "<i4")
        writers[i % len(writers)].write(tokens.tobytes())
        n_tokens += len(tokens)
        done += docs.nbytes(i) if sized else 1  # bytes: the total only at the last document
        fields = {"documents": i + 1} if sized else {}
        progress.update(done, **fields, tokens=n_tokens, tokens_per_s=n_tokens / max(time.time() - t0, 1e-9))
    progress.close()
    return n_tokens


def main(argv=None) -> int:
    from llama_jax.data.sources import DataError
    from llama_jax.tokenizer import Tokenizer, TokenizerError

    ap = argparse.ArgumentParser(prog="python -m llama_jax.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="stdlib | text:GLOB | jsonl:GLOB")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    ap.add_argument("--output", required=True, help="directory for the shards")
    ap.add_argument("--num_shards", type=int, default=8)
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.data.prepare")
    try:
        meta = prepare(args.source, Tokenizer(args.tokenizer), args.output, args.num_shards)
    except (DataError, TokenizerError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the shard files written to {args.output} are removed (run the command again)",
              file=sys.stderr)
        return 130
    print(f"wrote {meta['documents']} documents, {meta['tokens']:,} tokens in {len(meta['shards'])} shards "
          f"to {args.output}")
    if meta.get("empty_files"):
        print(f"note: {meta['empty_files']} empty file{'s' * (meta['empty_files'] > 1)} left out", file=sys.stderr)
    if meta.get("not_utf8_files"):
        bad = meta["not_utf8_files"]
        print(f"warning: {len(bad)} file{'s' * (len(bad) > 1)} had bytes that are not UTF-8, read as U+FFFD (first: "
              f"{bad[0]}; all are listed in metadata.json's not_utf8_files): convert them to UTF-8 from their "
              f"encoding and prepare again, e.g. iconv -f LATIN1 -t UTF-8 {bad[0]} > {bad[0]}.utf8", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
