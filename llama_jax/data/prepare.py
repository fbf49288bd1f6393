"""Pre-tokenize a corpus into ArrayRecord shards for pod-scale pretraining.

    python -m llama_jax.data.prepare --source='jsonl:/data/*.jsonl' --tokenizer=tok.model \\
        --output=/data/shards --num_shards=64

Each record is one document's token ids (little-endian int32, BOS and EOS included);
`metadata.json` lists the shards, the document and token counts and the tokenizer's
identity, which the pipeline checks against the run's tokenizer. Read them back with
`--config.data.source=shards:/data/shards`. Shards are written to temporary names and
renamed when complete, metadata last, so an interrupted run never leaves a directory
that looks finished; its rerun removes the shard files it left. Progress (documents,
tokens, tokens/s, ETA) is shown on stderr.
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
    os.makedirs(output, exist_ok=True)
    if os.path.exists(os.path.join(output, "metadata.json")):
        raise FileExistsError(f"{output}: already holds prepared shards (metadata.json); choose another --output")
    stale = sorted(f for f in os.listdir(output) if re.fullmatch(r"tokens-\d{5}-of-\d{5}\.array_record(\.tmp)?", f))
    if stale:  # no metadata.json: an interrupted run's shards, which would sit beside these unlisted
        print(f"removing {len(stale)} shard files of an interrupted run from {output}", file=sys.stderr)
        for f in stale:
            os.remove(os.path.join(output, f))
    names = [f"tokens-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    writers = [ArrayRecordWriter(os.path.join(output, n + ".tmp"), "group_size:1") for n in names]
    n_tokens, t0 = 0, time.time()
    progress = Progress(len(docs), what="documents", throttle=True)
    for i in range(len(docs)):
        tokens = np.asarray(tokenizer.encode(docs[i], bos=True, eos=True), "<i4")
        writers[i % num_shards].write(tokens.tobytes())
        n_tokens += len(tokens)
        progress.update(i + 1, tokens=n_tokens, tokens_per_s=n_tokens / max(time.time() - t0, 1e-9))
    progress.close()
    for w, n in zip(writers, names):
        w.close()
        os.replace(os.path.join(output, n + ".tmp"), os.path.join(output, n))
    meta = {"source": source, "documents": len(docs), "tokens": n_tokens, "shards": names,
            "tokenizer": tokenizer.identity()}
    with open(os.path.join(output, "metadata.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(output, "metadata.json.tmp"), os.path.join(output, "metadata.json"))
    return meta


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
    print(f"wrote {meta['documents']} documents, {meta['tokens']:,} tokens in {len(meta['shards'])} shards "
          f"to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
