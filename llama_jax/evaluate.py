"""Evaluation: held-out perplexity, k-shot multiple-choice log-likelihood (MMLU /
HellaSwag / ARC style), and reward-model accuracy per rating bucket (paper Table 8).

    python -m llama_jax.evaluate --checkpoint=DIR --task=perplexity --data=jsonl:held_out.jsonl
    python -m llama_jax.evaluate --checkpoint=DIR --task=multiple_choice --data=arc.jsonl --k_shot=5
    python -m llama_jax.evaluate --checkpoint=RM_DIR --task=reward_accuracy --data=pairs.jsonl

Multiple choice: JSONL lines `{"question": str, "choices": [str, ...], "answer": int | str}`
(answer = index or the text of the right choice). Each choice is scored by the summed
log-probability of its tokens after the prompt "Question: {q}\\nAnswer:" (preceded by
k solved examples from the same file, never the question itself nor a line asking the
same; choices must be distinct and not empty); `accuracy` takes the
highest sum, `accuracy_norm` the highest sum per character of the choice.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.data import sources
from llama_jax.data.sources import DataError
from llama_jax.model import Llama, LlamaConfig


def _bucket(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("config",))
def _row_logprobs(params, tokens, segment_ids, target_mask, *, config: LlamaConfig):
    """Sum over masked positions of log p(tokens[t+1] | tokens[..t]), and whether every
    masked target was the argmax. tokens/segment_ids/target_mask [B, T]."""
    logits = Llama(config).apply({"params": params}, tokens, None, segment_ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = tokens[:, 1:]
    tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = target_mask[:, 1:]
    greedy = jnp.argmax(logp, axis=-1) == targets
    return jnp.sum(tok_lp * mask, axis=1), jnp.all(greedy | (mask == 0), axis=1)


def loglikelihood(config: LlamaConfig, params, contexts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], batch_size: int = 8,
                  progress=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per pair.
    Pairs longer than max_seq_len keep their last max_seq_len tokens."""
    out = []
    rows = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if not len(ctx):  # the first token has no prediction: it would go unscored
            raise ValueError(f"loglikelihood: pair {i} has an empty context (start it with BOS)")
        seq = (list(ctx) + list(cont))[-config.max_seq_len:]
        rows.append((seq, min(len(cont), len(seq) - 1)))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = min(_bucket(max(len(s) for s, _ in chunk)), config.max_seq_len)
        tokens = np.zeros((batch_size, T), np.int32)
        seg = np.zeros((batch_size, T), np.int32)
        mask = np.zeros((batch_size, T), np.float32)
        for i, (seq, n_cont) in enumerate(chunk):
            tokens[i, :len(seq)], seg[i, :len(seq)] = seq, 1
            mask[i, len(seq) - n_cont:len(seq)] = 1.0
        lp, greedy = _row_logprobs(params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(mask), config=config)
        out += [(float(a), bool(b)) for a, b in zip(np.asarray(lp)[:len(chunk)], np.asarray(greedy)[:len(chunk)])]
        if progress is not None:
            progress(len(out), len(rows))
    return out


# ----------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------


def perplexity(config: LlamaConfig, params, tokenizer, source: str, seq_len: int = 512, batch_size: int = 8,
               max_batches: int = 0, progress=None) -> dict:
    """Token-level perplexity of `source` (a pretraining source spec: text:GLOB,
    jsonl:GLOB, stdlib:eval, ...), read once in order, packed like pretraining; every
    token is scored (the last batch is padded with empty rows), except each row's and
    each document's first, which have no context in their row."""
    from llama_jax import objectives
    from llama_jax.data import pretrain

    if pretrain.parse_source(source)[0] == "synthetic" and not max_batches:
        raise ValueError(f"{source}: an endless stream of random tokens; give --max_batches")
    seq_len = min(seq_len, config.max_seq_len)
    data = pretrain.make_dataset(source, tokenizer, seq_len, batch_size, split="eval", prefetch=0,
                                 drop_remainder=False)
    model = Llama(config)

    @jax.jit
    def step(params, batch):
        return objectives.next_token(lambda p, t, pos, s: model.apply({"params": p}, t, pos, s), params, batch)

    total, weight, batches = 0.0, 0.0, 0
    for batch in data:
        pad = batch_size - len(batch["tokens"])  # the last batch: empty rows (segment 0, nothing scored)
        batch = {k: np.pad(v, ((0, pad),) + ((0, 0),) * (v.ndim - 1)) for k, v in batch.items()}
        loss_sum, w, _ = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
        total, weight, batches = total + float(loss_sum), weight + float(w), batches + 1
        if progress is not None:
            progress(batches)
        if max_batches and batches >= max_batches:
            break
    data.close()
    if weight == 0:
        raise DataError(f"{source}: no tokens to evaluate")
    loss = total / weight
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(weight), "batches": batches}


# ----------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------


def _validate_mc(record: dict, where: str) -> None:
    sources.require(record, where, "question", str)
    choices = sources.require(record, where, "choices", list)
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not all(c.strip() for c in choices):  # scored on the prompt's trailing space alone, it would win
        raise DataError(f"{where}: a choice is empty")
    if len(set(choices)) < len(choices):  # which of two equal choices is the answer is a coin toss
        raise DataError(f"{where}: choices repeat {next(c for c in choices if choices.count(c) > 1)!r}")
    answer = record.get("answer")
    if isinstance(answer, bool) or not (isinstance(answer, int) and 0 <= answer < len(choices)
                                        or isinstance(answer, str) and answer in choices):
        raise DataError(f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}) or one of them,"
                        f" got {answer!r}")


def _answer_index(record: dict) -> int:
    a = record["answer"]
    return a if isinstance(a, int) else record["choices"].index(a)


def mc_prompt(record: dict, shots: Sequence[dict]) -> str:
    solved = "".join(f"Question: {s['question']}\nAnswer: {s['choices'][_answer_index(s)]}\n\n" for s in shots)
    return f"{solved}Question: {record['question']}\nAnswer:"


def multiple_choice(config: LlamaConfig, params, tokenizer, path: str, k_shot: int = 0, seed: int = 0,
                    limit: int = 0, batch_size: int = 8, progress=None) -> dict:
    data = sources.Jsonl(path, validate=_validate_mc)
    every = [data.record(i) for i in range(len(data))]
    records = every[:limit] if limit else every
    shots_used = min(k_shot, len(every) - 1)  # solved examples come from the whole file, never the question
    rng = random.Random(seed)
    contexts, continuations = [], []
    fewer_shots = cut = 0
    for qi, rec in enumerate(records):
        # never the question itself, nor another line asking the same (its answer would be in the prompt)
        others = [r for j, r in enumerate(every) if j != qi and r["question"] != rec["question"]]
        shots = rng.sample(others, min(shots_used, len(others)))
        while True:  # a prompt too long for the model drops solved examples, first ones first
            prompt = mc_prompt(rec, shots)
            # Tokenize prompt + choice together (as the model would read it); the choice's
            # tokens are what follows the prompt's (pieces never cross the space).
            fulls = [tokenizer.encode(f"{prompt} {choice}", bos=True) for choice in rec["choices"]]
            if not shots or max(map(len, fulls)) <= config.max_seq_len:
                break
            shots = shots[1:]
        fewer_shots += len(shots) < shots_used
        cut += max(map(len, fulls)) > config.max_seq_len  # even without examples: scored on its last tokens
        ctx = tokenizer.encode(prompt, bos=True)
        for full in fulls:
            n = len(ctx)
            while full[:n] != ctx[:n]:
                n -= 1
            contexts.append(full[:n])
            continuations.append(full[n:])
    scores = loglikelihood(config, params, contexts, continuations, batch_size, progress)
    correct = correct_norm = 0
    per_question = []
    i = 0
    for rec in records:
        n = len(rec["choices"])
        lps = np.array([s for s, _ in scores[i:i + n]])
        norm = lps / np.array([max(len(c), 1) for c in rec["choices"]])
        pick, pick_norm = int(np.argmax(lps)), int(np.argmax(norm))
        correct += pick == _answer_index(rec)
        correct_norm += pick_norm == _answer_index(rec)
        per_question.append(lps.tolist())
        i += n
    n = len(records)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "questions": n, "k_shot": shots_used,
            **({"k_shot_requested": k_shot} if shots_used < k_shot else {}),
            "questions_with_fewer_shots": fewer_shots, "questions_cut": cut, "loglikelihoods": per_question}


# ----------------------------------------------------------------------------------
# Reward models
# ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _scores(params, tokens, segment_ids, answer, *, config: LlamaConfig):
    return Llama(config, ("score",)).apply({"params": params}, tokens, None, segment_ids, score_mask=answer)


def score(config: LlamaConfig, params, tokenizer, dialogs: Sequence[Sequence[dict]], batch_size: int = 8,
          mesh=None, rules=None, progress=None, was_cut: list | None = None) -> np.ndarray:
    """Reward-model scores (raw, before the sigmoid) of complete dialogs (each ending
    with the assistant answer to be scored), read at the last token or averaged over the
    final answer's tokens (config.score_pooling), right-padded. A dialog longer than
    max_seq_len is cut as training cuts one: BOS kept, the prompt's first tokens dropped,
    then, if the answer alone is too long, the start of what is left (`was_cut`, a list,
    gets whether each dialog was). With `mesh` (params on it,
    e.g. a run's mesh across processes; every process calls this with the same dialogs)
    the batches go onto it whole and the activations are sharded by `rules`, as in training."""
    import contextlib

    from llama_jax import distributed, sharding
    from llama_jax.data.preference import cut_prompt

    put, ctx = jnp.asarray, contextlib.nullcontext
    if mesh is not None:
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        put = functools.partial(jax.device_put, device=whole)
        ctx = functools.partial(sharding.activate, mesh, rules if rules is not None else sharding.DEFAULT_RULES)
    rows = []
    for d in dialogs:
        tokens, mask = tokenizer.encode_dialog_for_training(d, last_turn_only=True)
        over = len(tokens) - config.max_seq_len
        if over > 0:  # as training cuts a pair: prompt tokens after BOS first, then from the start
            tokens, mask = cut_prompt(tokens, mask, over)
        if was_cut is not None:
            was_cut.append(over > 0)
        rows.append((tokens[-config.max_seq_len:], mask[-config.max_seq_len:]))
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = min(_bucket(max(len(r) for r, _ in chunk)), config.max_seq_len)
        tokens = np.zeros((batch_size, T), np.int32)
        seg = np.zeros((batch_size, T), np.int32)
        answer = np.zeros((batch_size, T), np.float32)
        for i, (r, m) in enumerate(chunk):
            tokens[i, :len(r)], seg[i, :len(r)], answer[i, :len(m)] = r, 1, m
        with ctx():
            out.append((_scores(params, put(tokens), put(seg), put(answer), config=config), len(chunk)))
        if progress is not None:
            progress(start + len(chunk), len(rows))
    # fetched once every batch is dispatched: the device never waits for the host's padding
    return np.concatenate([distributed.to_host(s)[:n] for s, n in out]) if out else np.zeros((0,), np.float32)


def reward_accuracy(config: LlamaConfig, params, tokenizer, path: str, batch_size: int = 8, progress=None,
                    mesh=None) -> dict:
    """Accuracy (chosen scored above rejected) per rating bucket and overall (paper Table
    8 layout), per toy task (accuracy_TASK) where pairs name their `task`, plus
    unsafe-response recall at the 0.5 threshold where safety labels exist (sigmoid(score)
    < 0.5 counted as 'unsafe'). Pairs are read as training reads them (`pairs_left_out`:
    those the paper's filter drops); a pair scored equal both ways counts as wrong
    (`ties`); `pairs_cut`: those longer than max_seq_len, cut as `score` cuts them."""
    from llama_jax.data.preference import RATINGS, PreferencePairs

    pairs = PreferencePairs(path)
    recs = [pairs[i] for i in range(len(pairs))]
    cut: list[bool] = []

    def half(offset):
        return None if progress is None else (lambda done, total: progress(offset + done, 2 * total))

    chosen = score(config, params, tokenizer, [r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]
                                               for r in recs], batch_size, mesh, progress=half(0), was_cut=cut)
    rejected = score(config, params, tokenizer, [r["prompt"] + [{"role": "assistant", "content": r["rejected"]}]
                                                 for r in recs], batch_size, mesh, progress=half(len(recs)),
                     was_cut=cut)
    right = chosen > rejected
    out: dict = {"pairs": len(recs), "accuracy": float(right.mean()), "ties": int((chosen == rejected).sum()),
                 "pairs_left_out": int(pairs.dropped),
                 "pairs_cut": int(np.sum(np.logical_or(cut[:len(recs)], cut[len(recs):])))}
    for rating in RATINGS:
        idx = [i for i, r in enumerate(recs) if r.get("rating") == rating]
        out[rating] = float(right[idx].mean()) if idx else None
    for task in sorted({r["task"] for r in recs if r.get("task")}):  # pairs that name their toy task
        out[f"accuracy_{task}"] = float(np.mean([right[i] for i, r in enumerate(recs) if r.get("task") == task]))
    unsafe = [s for r, c, j in zip(recs, chosen, rejected) for s, safe in ((c, r.get("chosen_safe")),
                                                                            (j, r.get("rejected_safe")))
              if safe is False]
    if unsafe:
        out["unsafe_recall"] = float(np.mean(1 / (1 + np.exp(-np.array(unsafe))) < 0.5))
    return out


def table8(results: dict) -> str:
    """The paper's Table 8 layout: one row, the four rating buckets and the average."""
    from llama_jax.data.preference import RATINGS

    head = "| " + " | ".join(r.replace("_", " ") for r in RATINGS) + " | avg |"
    cells = [f"{100 * results[r]:.1f}" if results.get(r) is not None else "-" for r in RATINGS]
    return head + "\n|" + "---|" * 5 + "\n| " + " | ".join(cells) + f" | {100 * results['accuracy']:.1f} |"


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--step", type=int, default=None, help="a step of a run (default: its latest)")
    ap.add_argument("--task", required=True, choices=["perplexity", "multiple_choice", "reward_accuracy"])
    ap.add_argument("--data", required=True, help="source spec (perplexity) or JSONL file")
    ap.add_argument("--k_shot", type=int, default=0, help="solved examples before each question (multiple_choice)")
    ap.add_argument("--seq_len", type=int, default=512, help="window length (perplexity; at most max_seq_len)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_batches", type=int, default=0, help="stop after N batches (perplexity; 0 = all)")
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (multiple_choice; 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="", help="also write the results, with their settings, as JSON here")
    from llama_jax.generate import add_dtype_arg

    add_dtype_arg(ap)
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.evaluate")
    for flag, least in (("seq_len", 2), ("batch_size", 1), ("k_shot", 0), ("max_batches", 0), ("limit", 0)):
        if getattr(args, flag) < least:
            ap.error(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    ignored = {"perplexity": ("k_shot", "limit"), "multiple_choice": ("seq_len", "max_batches"),
               "reward_accuracy": ("k_shot", "seq_len", "max_batches", "limit")}[args.task]
    given = [f for f in ignored if getattr(args, f) != ap.get_default(f)]
    if given:
        ap.error(f"{', '.join('--' + f for f in given)}: not used by --task={args.task}")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        ap.error(f"--output={args.output}: its directory does not exist")  # before the evaluation, not after

    from llama_jax import checkpoint as ckpt
    from llama_jax.generate import load_on_local_devices
    from llama_jax.metrics import Progress
    from llama_jax.sharding import MeshError
    from llama_jax.tokenizer import TokenizerError

    try:
        step, _ = ckpt.read_meta(args.checkpoint, args.step)
        need = "score" if args.task == "reward_accuracy" else "lm"
        # split over every local device, as generate and chat load a model: a 70B fits a host's GPUs
        cfg, params, _, tok, mesh = load_on_local_devices(args.checkpoint, step, need, args.dtype)
        if args.task == "perplexity":
            if args.seq_len > cfg.max_seq_len:
                print(f"note: --seq_len {args.seq_len} is cut to the model's max_seq_len {cfg.max_seq_len}")
                args.seq_len = cfg.max_seq_len  # what is used, and what --output records
            progress = Progress(args.max_batches or None, what="batches", throttle=True)
            res = perplexity(cfg, params, tok, args.data, args.seq_len, args.batch_size, args.max_batches,
                             progress.update)
            progress.close()
            cut = f", the first {res['batches']} batches" if args.max_batches and res["batches"] == args.max_batches \
                else ""
            print(f"perplexity {res['perplexity']:.3f} (loss {res['loss']:.4f} nats/token over {res['tokens']:,}"
                  f" tokens{cut})")
        elif args.task == "multiple_choice":
            progress = Progress(None, what="choices scored", throttle=True)
            res = multiple_choice(cfg, params, tok, args.data, args.k_shot, args.seed, args.limit, args.batch_size,
                                  progress.update)
            progress.close()
            print(f"{res['k_shot']}-shot accuracy {res['accuracy']:.4f} (length-normalised {res['accuracy_norm']:.4f})"
                  f" on {res['questions']} questions")
            if res["k_shot"] < args.k_shot:
                print(f"note: {args.k_shot} shots requested; the file has only {res['k_shot']} other questions")
            if res["questions_with_fewer_shots"]:
                print(f"note: {res['questions_with_fewer_shots']} questions got fewer solved examples, to fit the "
                      f"model's max_seq_len {cfg.max_seq_len} (or for want of other questions)")
            if res["questions_cut"]:
                print(f"warning: {res['questions_cut']} questions are longer than max_seq_len {cfg.max_seq_len} even "
                      "without examples; each choice was scored on its last max_seq_len tokens")
        else:
            progress = Progress(None, what="answers scored", throttle=True)
            res = reward_accuracy(cfg, params, tok, args.data, args.batch_size, progress.update, mesh)
            progress.close()
            print(table8(res))
            print(f"{res['pairs']} pairs" + (f" ({res['pairs_left_out']} left out by the paper's filter, as in "
                                             "training)" if res["pairs_left_out"] else "")
                  + (f"; {res['ties']} scored equal both ways, counted wrong" if res["ties"] else "")
                  + (f"; {res['pairs_cut']} longer than max_seq_len {cfg.max_seq_len}, their prompts' starts cut"
                     if res["pairs_cut"] else ""))
            if "unsafe_recall" in res:
                print(f"unsafe-response recall at 0.5: {res['unsafe_recall']:.3f}")
        if args.output:
            settings = {k: v for k, v in vars(args).items() if k != "output"}
            with open(args.output, "w") as f:
                json.dump({**res, "settings": {**settings, "step": step}}, f, indent=1)
    except (ckpt.CheckpointError, TokenizerError, DataError, MeshError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
