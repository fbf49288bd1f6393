"""Evaluation: held-out perplexity, k-shot multiple-choice log-likelihood (MMLU /
HellaSwag / ARC style), and reward-model accuracy per rating bucket (paper Table 8).

    python -m llama_jax.evaluate --checkpoint=DIR --task=perplexity --data=jsonl:held_out.jsonl
    python -m llama_jax.evaluate --checkpoint=DIR --task=multiple_choice --data=arc.jsonl --k_shot=5
    python -m llama_jax.evaluate --checkpoint=DIR --task=multiple_choice --data=mmlu_test.jsonl \\
        --shots=mmlu_dev.jsonl --k_shot=5 --style=letters
    python -m llama_jax.evaluate --checkpoint=RM_DIR --task=reward_accuracy --data=pairs.jsonl

perplexity: --data is a source spec, as a pretraining run's: text:GLOB, jsonl:GLOB (a
"text" field a line), stdlib:eval, synthetic (with --max_batches).

multiple_choice: JSONL lines {"question": str, "choices": [str, ...], "answer": int | str}
(answer = index, or the text of the right choice), optionally "subject": str. Convert
other layouts first: HellaSwag's ctx/endings/label -> question/choices/answer (label as a
number; scored with --style=continuation), ARC's choices.text and answerKey -> choices and the key's index, BoolQ's
passage + question -> question with choices ["no", "yes"]. Each choice is scored by the
summed log-probability of its tokens after the prompt, preceded by k solved examples
(--shots=FILE, e.g. MMLU's dev split, else the file's other questions; never a line
asking the same question; of the question's own subject where it names one). Styles:
qa, "Question: {q}\\nAnswer:" and the choice's text; letters, the MMLU layout,
"{q}\\nA. {choice}\\nB. ...\\nAnswer:" and the choice's letter; continuation, the
question's text as it is (HellaSwag's context) and the choice as what follows it. accuracy takes the
highest sum, accuracy_norm the highest sum per character of the choice (its text, without
the space before it, as lm-evaluation-harness's acc_norm; with letters, the same as
accuracy). A question with an empty choice is left out and counted; repeated choices are
scored (a pick equal to the answer's text counts as right).

reward_accuracy: preference JSONL as the reward-model stages read it ({"prompt": [turns],
"chosen": str, "rejected": str, "rating": ...}); a checkpoint with a score head, or a DPO
policy with --reference=ITS_INIT_FROM (DPO's implicit reward, log pi - log ref, decides).
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


def _length_bucket(n: int) -> int:
    """A padded length for n tokens: a multiple of 32, and above 256 of an eighth of the
    next power of two (under a quarter padding, an eighth on average over lengths; 24
    shapes up to 4,096 tokens, not 128)."""
    step = max(32, (1 << (n - 1).bit_length()) // 8)
    return max(32, -(-n // step) * step)


def loglikelihood(config: LlamaConfig, params, contexts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], batch_size: int = 8,
                  progress=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per pair.
    Pairs longer than max_seq_len keep their last max_seq_len tokens. Pairs are batched
    longest first (a batch's rows of like lengths), each batch padded to
    `_length_bucket` (at most max_seq_len). Token ids of the pair as the model reads them:
    a continuation tokenized on its own can differ from its tokens after the context
    (" sys" alone is two pieces, after "x" one): encode context + continuation together
    and split, as `multiple_choice` does."""
    from llama_jax.generate import check_params, token_rows

    check_params(params, "loglikelihood")
    contexts = token_rows(contexts, config.vocab_size, "loglikelihood: context", allow_empty=True)
    continuations = token_rows(continuations, config.vocab_size, "loglikelihood: continuation")
    if len(contexts) != len(continuations):
        raise ValueError(f"loglikelihood: {len(contexts)} contexts and {len(continuations)} continuations; give one "
                         "context a continuation")
    rows = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if not len(ctx):  # the first token has no prediction: it would go unscored
            raise ValueError(f"loglikelihood: pair {i} has an empty context (start it with BOS)")
        seq = (list(ctx) + list(cont))[-config.max_seq_len:]
        rows.append((seq, min(len(cont), len(seq) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = min(_length_bucket(len(rows[chunk[0]][0])), config.max_seq_len)
        tokens = np.zeros((batch_size, T), np.int32)
        seg = np.zeros((batch_size, T), np.int32)
        mask = np.zeros((batch_size, T), np.float32)
        for i, r in enumerate(chunk):
            seq, n_cont = rows[r]
            tokens[i, :len(seq)], seg[i, :len(seq)] = seq, 1
            mask[i, len(seq) - n_cont:len(seq)] = 1.0
        lp, greedy = _row_logprobs(params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(mask), config=config)
        for r, a, b in zip(chunk, np.asarray(lp), np.asarray(greedy)):
            out[r] = (float(a), bool(b))
        if progress is not None:
            progress(start + len(chunk), len(rows))
    return out


# ----------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------


def perplexity(config: LlamaConfig, params, tokenizer, source: str, seq_len: int = 512, batch_size: int = 8,
               max_batches: int = 0, progress=None) -> dict:
    """Token-level perplexity of `source` (a pretraining source spec: text:GLOB,
    jsonl:GLOB, stdlib:eval, ...), read once in order, packed like pretraining into rows of
    `seq_len` (for a run, the length it trained at: `trained_seq_len(workdir)`, as the
    command line's default; 512 scores positions a shorter-trained model never saw); every
    token is scored (the last batch is padded with empty rows), except each row's and
    each document's first, which have no context in their row."""
    from llama_jax import objectives
    from llama_jax.data import pretrain

    if pretrain.source_kinds(source)[0] == "synthetic" and not max_batches:
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


MC_STYLES = ("qa", "letters", "continuation")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _validate_mc(record: dict, where: str) -> None:
    if isinstance(record.get("choices"), dict) and "text" in record["choices"]:
        raise DataError(f"{where}: 'choices' is ARC's layout ({{\"text\": [...], \"label\": [...]}}, with "
                        "answerKey); write it as {\"question\", \"choices\": [texts], \"answer\": the index of "
                        "answerKey among the labels}")
    if "ctx" in record and "endings" in record and "choices" not in record:
        raise DataError(f"{where}: HellaSwag's layout (ctx, endings, label); write it as {{\"question\": ctx, "
                        "\"choices\": endings, \"answer\": int(label)}} and use --style=continuation")
    sources.require(record, where, "question", str)
    choices = sources.require(record, where, "choices", list)
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
    if "subject" in record:
        sources.require(record, where, "subject", str)
    answer = record.get("answer")
    if isinstance(answer, str) and choices.count(answer) > 1:  # which of the equal ones is meant?
        raise DataError(f"{where}: 'answer' {answer!r} is {choices.count(answer)} of the choices; give its index")
    if isinstance(answer, bool) or not (isinstance(answer, int) and 0 <= answer < len(choices)
                                        or isinstance(answer, str) and answer in choices):
        hint = ""
        if isinstance(answer, str) and answer.strip().isdigit():
            hint = f" (an index is a JSON number: \"answer\": {answer.strip()}, not \"{answer.strip()}\")"
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
            hint = f" (for a letter key, give its index: \"answer\": {LETTERS.index(answer.strip().upper())})"
        raise DataError(f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}) or one of them,"
                        f" got {answer!r}{hint}")


def _answer_index(record: dict) -> int:
    a = record["answer"]
    return a if isinstance(a, int) else record["choices"].index(a)


def mc_prompt(record: dict, shots: Sequence[dict], style: str = "qa") -> str:
    """The prompt a question's choices are scored after. `qa`: "Question: {q}\nAnswer:"
    after each solved example's "Question: ...\nAnswer: {right choice}\n\n". `letters`
    (the MMLU layout): "{q}\nA. {choice}\nB. ...\nAnswer:" with solved examples answered
    by their letter, under "The following are multiple choice questions (with answers)
    about {subject}." when the question names its `subject`. `continuation` (HellaSwag's
    layout): the question's text as it is, each choice scored as what follows it, after
    solved examples "{q} {right choice}\n\n"."""
    if style == "continuation":
        return "".join(f"{s['question']} {s['choices'][_answer_index(s)]}\n\n" for s in shots) + record["question"]
    if style == "qa":
        solved = "".join(f"Question: {s['question']}\nAnswer: {s['choices'][_answer_index(s)]}\n\n" for s in shots)
        return f"{solved}Question: {record['question']}\nAnswer:"

    def block(r):
        return r["question"] + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(r["choices"])) + "\nAnswer:"

    subject = record.get("subject")
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
        if subject else ""
    return head + "".join(f"{block(s)} {LETTERS[_answer_index(s)]}\n\n" for s in shots) + block(record)


def mc_continuations(record: dict, style: str = "qa") -> list[str]:
    """What is scored after the prompt, per choice (" " + the choice, or " " + its letter)."""
    return [f" {LETTERS[i]}" if style == "letters" else f" {c}" for i, c in enumerate(record["choices"])]


def multiple_choice(config: LlamaConfig, params, tokenizer, path: str, k_shot: int = 0, seed: int = 0,
                    limit: int = 0, batch_size: int = 8, progress=None, shots_path: str | None = None,
                    style: str = "qa") -> dict:
    """k-shot multiple-choice accuracy (see the module's docstring). Solved examples come
    from `shots_path` (e.g. MMLU's dev split) or else the file's other questions; never a
    line asking the same question, and of the question's own `subject` where it names
    one and examples of it exist. A question with an empty choice is left out (counted,
    first one named); repeated choices are scored, a pick of a choice equal to the answer
    counting as right."""
    if style not in MC_STYLES:
        raise ValueError(f"style {style!r}: expected one of {MC_STYLES}")
    data = sources.Jsonl(path, validate=_validate_mc)
    every = [data.record(i) for i in range(len(data))]
    wheres = [data.where(i) for i in range(len(data))]
    solved: list[tuple[dict, str]] = []  # (record, file:line) of --shots, read once
    if shots_path is not None:
        shots_file = sources.Jsonl(shots_path, validate=_validate_mc)
        solved = [(shots_file.record(i), shots_file.where(i)) for i in range(len(shots_file))]
    if style == "letters":
        many = next((w for r, w in [*zip(every, wheres), *solved] if len(r["choices"]) > len(LETTERS)), None)
        if many:
            raise DataError(f"{many}: more than {len(LETTERS)} choices cannot be lettered; use --style=qa")

    def complete(r):  # a question with an empty choice: that choice, scored on the space alone, would win
        return all(c.strip() for c in r["choices"])

    considered = range(min(limit, len(every)) if limit else len(every))
    usable = [i for i in considered if complete(every[i])]
    left_out = [wheres[i] for i in considered if not complete(every[i])]
    if not usable:
        raise DataError(f"{left_out[0]}: a choice is empty, as in every question; nothing to score")
    if shots_path is None:  # (index in the file, record): the file's own questions
        pool = [(j, r) for j, r in enumerate(every) if complete(r)]
    else:
        pool = [(-1, r) for r, _ in solved if complete(r)]
    rng = random.Random(seed)
    contexts, continuations, n_shots = [], [], []
    cut = 0
    for qi in usable:
        rec = every[qi]
        # never the question itself, nor another line asking the same (its answer would be in the prompt)
        others = [r for j, r in pool if j != qi and r["question"] != rec["question"]]
        if rec.get("subject") and any(r.get("subject") == rec["subject"] for r in others):
            others = [r for r in others if r.get("subject") == rec["subject"]]
        shots = rng.sample(others, min(k_shot, len(others)))
        n_shots.append(len(shots))
        while True:  # a prompt too long for the model drops solved examples, first ones first
            prompt = mc_prompt(rec, shots, style)
            # Tokenize prompt + choice together (as the model would read it); the choice's
            # tokens are what follows the prompt's (pieces never cross the space).
            fulls = [tokenizer.encode(prompt + cont, bos=True) for cont in mc_continuations(rec, style)]
            if not shots or max(map(len, fulls)) <= config.max_seq_len:
                break
            shots = shots[1:]
        n_shots[-1] = (n_shots[-1], len(shots))  # (drawn, kept)
        cut += max(map(len, fulls)) > config.max_seq_len  # even without examples: scored on its last tokens
        ctx = tokenizer.encode(prompt, bos=True)
        split = []
        for full in fulls:
            n = len(ctx)
            while full[:n] != ctx[:n]:
                n -= 1
            split.append((full[:n], full[n:]))
        # too long even without examples: every choice is read after the same last tokens of the prompt (each cut
        # on its own, a longer choice would be read after less of it), as many as the longest choice leaves
        room = config.max_seq_len - max(len(c) for _, c in split)
        over = max(len(c) + len(cont) for c, cont in split) > config.max_seq_len
        for c, cont in split:
            contexts.append(c[-room:] if over and room >= 1 else c)
            continuations.append(cont)
    scores = loglikelihood(config, params, contexts, continuations, batch_size, progress)
    correct = correct_norm = repeated = 0
    per_question = []
    i = 0
    for qi in usable:
        rec = every[qi]
        choices, answer = rec["choices"], _answer_index(rec)
        n = len(choices)
        lps = np.array([s for s, _ in scores[i:i + n]])
        norm = lps / np.array([1 if style == "letters" else len(c) for c in choices])  # per character (lm-eval's)
        pick, pick_norm = int(np.argmax(lps)), int(np.argmax(norm))
        correct += choices[pick] == choices[answer]  # a repeat of the answer is the answer
        correct_norm += choices[pick_norm] == choices[answer]
        repeated += len(set(choices)) < n
        per_question.append({"where": wheres[qi], "answer": answer, "pick": pick, "pick_norm": pick_norm,
                             "loglikelihoods": lps.tolist()})
        i += n
    n = len(usable)
    shots_used = max(drawn for drawn, _ in n_shots)  # k_shot, or as many as the examples allow
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "questions": n, "k_shot": shots_used,
            **({"k_shot_requested": k_shot} if shots_used < k_shot else {}), "style": style,
            "questions_with_fewer_shots": sum(kept < shots_used for _, kept in n_shots), "questions_cut": cut,
            "questions_left_out": len(left_out), **({"first_left_out": left_out[0]} if left_out else {}),
            "questions_with_repeated_choices": repeated, "per_question": per_question}


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
    max_seq_len is cut as training cuts one: BOS kept, the prompt's first tokens dropped
    (its last max_seq_len // 2 kept), then, if the answer is still too long, its end
    (`was_cut`, a list, gets whether each dialog was). With `mesh` (params on it,
    e.g. a run's mesh across processes; every process calls this with the same dialogs)
    the batches go onto it whole and the activations are sharded by `rules`, as in training."""
    from llama_jax.data.preference import cut_prompt

    if len(dialogs) and isinstance(dialogs[0], dict):  # one dialog: its messages would each be read as a dialog
        raise ValueError("score: dialogs is a list of dialogs (each a list of messages); got one dialog: pass "
                         "[dialog]")
    rows = []
    for d in dialogs:
        tokens, mask = tokenizer.encode_dialog_for_training(d, last_turn_only=True)
        over = len(tokens) - config.max_seq_len
        if over > 0:  # as training cuts a pair: prompt tokens after BOS first, then the answer's end
            tokens, mask = cut_prompt(tokens, mask, over, config.max_seq_len)
        if was_cut is not None:
            was_cut.append(over > 0)
        rows.append((tokens[:config.max_seq_len], mask[:config.max_seq_len]))
    return score_rows(config, params, rows, batch_size, mesh, rules, progress)


def _answer_logprob(params, tokens, segment_ids, answer, *, config: LlamaConfig):
    return _row_logprobs(params, tokens, segment_ids, answer, config=config)[0]


def score_rows(config: LlamaConfig, params, rows: Sequence[tuple[list, list]], batch_size: int = 8, mesh=None,
               rules=None, progress=None, logprob: bool = False) -> np.ndarray:
    """`score` of rows already encoded and cut: (tokens, final-answer mask) each; with
    `logprob`, of a language model instead: the summed log-probability of each row's
    final answer (its masked tokens, EOS included), DPO's log pi(y | x)."""
    import contextlib

    from llama_jax import distributed, sharding

    put, ctx = jnp.asarray, contextlib.nullcontext
    if mesh is not None:
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        put = functools.partial(jax.device_put, device=whole)
        ctx = functools.partial(sharding.activate, mesh, rules if rules is not None else sharding.DEFAULT_RULES)
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
            out.append(((_answer_logprob if logprob else _scores)(params, put(tokens), put(seg), put(answer),
                                                                   config=config), len(chunk)))
        if progress is not None:
            progress(start + len(chunk), len(rows))
    # fetched once every batch is dispatched: the device never waits for the host's padding
    return np.concatenate([distributed.to_host(s)[:n] for s, n in out]) if out else np.zeros((0,), np.float32)


def reward_accuracy(config: LlamaConfig, params, tokenizer, path: str, batch_size: int = 8, progress=None,
                    mesh=None, seq_len: int | None = None, reference=None) -> dict:
    """Accuracy (chosen scored above rejected) per rating bucket and overall (paper Table
    8 layout), per toy task (accuracy_TASK) where pairs name their `task`, plus
    unsafe-response recall at the 0.5 threshold where safety labels exist (sigmoid(score)
    < 0.5 counted as 'unsafe'). Pairs are read and cut as training reads and cuts them at
    `seq_len` (default the model's max_seq_len): the same prompt tokens off both sides
    (`pairs_left_out`: those the paper's filter drops; `pairs_cut`: those longer than
    seq_len; `pairs_same_once_cut`: those whose two sides are then the same tokens). A pair
    scored equal both ways counts as wrong (`ties`). With `reference` = (config, params,
    mesh) of a DPO run's reference policy, `params` are a language model's (the DPO
    policy) and each answer's score is DPO's implicit reward over beta, log pi(y | x) -
    log ref(y | x) (no unsafe-response recall: there is no probability to threshold)."""
    from llama_jax.data.preference import RATINGS, PreferencePairs, _EncodePair

    seq_len = min(seq_len or config.max_seq_len, config.max_seq_len)
    pairs = PreferencePairs(path)
    recs = [pairs[i] for i in range(len(pairs))]
    encoder = _EncodePair(tokenizer, seq_len, "none")
    encoded = [encoder.encode(r["prompt"], r["chosen"], r["rejected"]) for r in recs]
    rows = [encoder.cut(e) for e in encoded]
    flags = [encoder.was_cut(e, row, r) for e, row, r in zip(encoded, rows, recs)]
    cut, same = sum(c for c, _ in flags), sum(s for _, s in flags)

    def half(offset):
        return None if progress is None else (lambda done, total: progress(offset + done, 2 * total))

    def scores(side: int, offset: int) -> np.ndarray:
        mine = score_rows(config, params, [r[side] for r in rows], batch_size, mesh, progress=half(offset),
                          logprob=reference is not None)
        if reference is None:
            return mine
        ref_config, ref_params, ref_mesh = reference
        # the policy's context, as DPO's training scored the reference (a run that extended init_from's context)
        ref_config = ref_config.replace(max_seq_len=max(ref_config.max_seq_len, config.max_seq_len))
        return mine - score_rows(ref_config, ref_params, [r[side] for r in rows], batch_size, ref_mesh, logprob=True)

    chosen, rejected = scores(0, 0), scores(1, len(recs))
    right = chosen > rejected
    out: dict = {"pairs": len(recs), "accuracy": float(right.mean()), "ties": int((chosen == rejected).sum()),
                 "pairs_left_out": int(pairs.dropped), "pairs_cut": cut, "pairs_same_once_cut": same}
    for rating in RATINGS:
        idx = [i for i, r in enumerate(recs) if r.get("rating") == rating]
        out[rating] = float(right[idx].mean()) if idx else None
        out[f"{rating}_pairs"] = len(idx)
    for task in sorted({r["task"] for r in recs if r.get("task")}):  # pairs that name their toy task
        out[f"accuracy_{task}"] = float(np.mean([right[i] for i, r in enumerate(recs) if r.get("task") == task]))
    unsafe = [s for r, c, j in zip(recs, chosen, rejected) for s, safe in ((c, r.get("chosen_safe")),
                                                                            (j, r.get("rejected_safe")))
              if safe is False]
    if unsafe and reference is None:
        out["unsafe_recall"] = float(np.mean(1 / (1 + np.exp(-np.array(unsafe))) < 0.5))
        out["unsafe_answers"] = len(unsafe)
    return out


def table8(results: dict) -> str:
    """The paper's Table 8 layout: one row, the four rating buckets and the average."""
    from llama_jax.data.preference import RATINGS

    head = "| | " + " | ".join(r.replace("_", " ") for r in RATINGS) + " | avg |"
    cells = [f"{100 * results[r]:.1f}" if results.get(r) is not None else "-" for r in RATINGS]
    table = head + "\n|" + "---|" * 6 + "\n| accuracy | " + " | ".join(cells) + \
        f" | {100 * results['accuracy']:.1f} |"
    if all(f"{r}_pairs" in results for r in RATINGS):  # how many pairs each cell is
        table += "\n| pairs | " + " | ".join(str(results[f"{r}_pairs"]) for r in RATINGS) + f" | {results['pairs']} |"
    return table


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def trained_seq_len(checkpoint: str) -> int | None:
    """The seq_len `checkpoint` was trained at: its latest checkpoint's record (the
    longest rows of its run and of the init_from it began from; an export keeps it), else
    its run's config.json; None for a converted model, which records none."""
    from llama_jax.checkpoint import CheckpointError, read_meta
    from llama_jax.workdir import recorded_config

    try:
        seq_len = read_meta(checkpoint)[1].get("trained_seq_len")
    except (CheckpointError, OSError):
        seq_len = None
    if seq_len is None:  # saved before the record
        seq_len = recorded_config(checkpoint).get("seq_len")
    return seq_len if isinstance(seq_len, int) and seq_len >= 2 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's workdir, or an import or export")
    ap.add_argument("--step", type=int, default=None, help="a step of a run (default: its latest)")
    ap.add_argument("--task", required=True, choices=["perplexity", "multiple_choice", "reward_accuracy"])
    ap.add_argument("--data", required=True, help="a source spec (perplexity: text:GLOB, jsonl:GLOB, stdlib:eval, "
                                                  "synthetic) or a JSONL file (the other tasks; formats above)")
    # task flags default to None, so that one given to a task that does not use it is refused
    ap.add_argument("--k_shot", type=int, default=None, help="solved examples before each question "
                                                             "(multiple_choice; default 0)")
    ap.add_argument("--shots", default=None, help="JSONL of solved examples, e.g. MMLU's dev split (multiple_choice; "
                                                  "default: the --data file's other questions)")
    ap.add_argument("--style", choices=MC_STYLES, default=None,
                    help="qa: 'Question: ...\\nAnswer:' and each choice's text; letters: the MMLU layout, lettered "
                         "choices and each choice's letter; continuation: the question's text as it is and each "
                         "choice as what follows it (HellaSwag's layout) (multiple_choice; default qa)")
    ap.add_argument("--seed", type=int, default=None, help="which solved examples are drawn (multiple_choice; "
                                                           "default 0)")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only (multiple_choice; default all)")
    ap.add_argument("--seq_len", type=int, default=None,
                    help="window length (perplexity), or where pairs are cut (reward_accuracy); default the run's "
                         "config.seq_len, the length it trained at (from its config.json), else 512 (perplexity) or "
                         "the model's max_seq_len (reward_accuracy); at most the model's max_seq_len")
    ap.add_argument("--max_batches", type=int, default=None, help="stop after N batches (perplexity; default all)")
    ap.add_argument("--reference", default=None, help="a DPO run's reference policy (its init_from): --checkpoint is "
                                                       "then the DPO policy, and each answer is scored by DPO's "
                                                       "implicit reward (reward_accuracy)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--output", default="", help="also write the results, with their settings, as JSON to this new "
                                                 "file (multiple_choice: each question's scores and picks too)")
    from llama_jax.generate import add_dtype_arg

    add_dtype_arg(ap)
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.evaluate")
    from llama_jax.checkpoint import quiet_orbax

    quiet_orbax()  # a damaged checkpoint: one error line, not Orbax's and TensorStore's logs
    used = {"perplexity": ("seq_len", "max_batches"), "multiple_choice": ("k_shot", "shots", "style", "seed", "limit"),
            "reward_accuracy": ("seq_len", "reference")}[args.task]
    given = [f for f in ("seq_len", "max_batches", "k_shot", "shots", "style", "seed", "limit", "reference")
             if f not in used and getattr(args, f) is not None]
    if given:
        ap.error(f"{', '.join('--' + f for f in given)}: not used by --task={args.task}")
    trained = trained_seq_len(args.checkpoint) if args.seq_len is None and "seq_len" in used else None
    if trained:
        print(f"--seq_len {trained}: the length {args.checkpoint} trained at (its record)")
    for flag, default in (("seq_len", trained or (512 if args.task == "perplexity" else None)), ("max_batches", 0),
                          ("k_shot", 0), ("seed", 0), ("limit", 0),
                          ("style", "qa")):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    for flag, least in (("seq_len", 2), ("batch_size", 1), ("k_shot", 0), ("max_batches", 0), ("limit", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            ap.error(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    if args.shots and not os.path.isfile(args.shots):
        ap.error(f"--shots={args.shots}: no such file")
    if args.output:  # before the evaluation, not after
        if os.path.isdir(args.output):
            ap.error(f"--output={args.output}: a directory; give a file name")
        if os.path.exists(args.output):
            ap.error(f"--output={args.output}: exists; choose a new file (nothing is overwritten)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            ap.error(f"--output={args.output}: its directory does not exist")
        if not os.access(os.path.dirname(os.path.abspath(args.output)), os.W_OK):
            ap.error(f"--output={args.output}: its directory is not writable")

    from llama_jax import checkpoint as ckpt
    from llama_jax.generate import load_on_local_devices
    from llama_jax.metrics import Progress
    from llama_jax.sharding import MeshError
    from llama_jax.tokenizer import TokenizerError

    try:
        step, _ = ckpt.read_meta(args.checkpoint, args.step)
        need = "score" if args.task == "reward_accuracy" and not args.reference else "lm"
        # split over every local device, as generate and chat load a model: a 70B fits a host's GPUs
        cfg, params, _, tok, mesh = load_on_local_devices(args.checkpoint, step, need, args.dtype)
        reference = None
        if args.reference:  # a DPO policy against its reference: the implicit reward
            # the step the DPO run started from (its init_from may have trained on since), when this is that run's
            began = (ckpt.read_meta(args.checkpoint, step)[1].get("init_from") or {})
            ref_step = None
            if began.get("path") and os.path.abspath(args.reference) == began["path"]:
                ref_step = began.get("step")
            elif began.get("path"):
                print(f"warning: --reference={args.reference} is not {args.checkpoint}'s reference, "
                      f"{began['path']} (step {began.get('step')}): its implicit reward is against another model",
                      file=sys.stderr)
            ref_cfg, ref_params, _, ref_tok, ref_mesh = load_on_local_devices(args.reference, ref_step, "lm",
                                                                              args.dtype)
            if ref_tok.identity()["sha256"] != tok.identity()["sha256"]:
                raise ValueError(f"--reference={args.reference}: another tokenizer than {args.checkpoint}'s; a DPO "
                                 "run's reference is its init_from, with the same tokenizer")
            reference = (ref_cfg, ref_params, ref_mesh)
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
                                  progress.update, args.shots, args.style)
            progress.close()
            print(f"{res['k_shot']}-shot accuracy {res['accuracy']:.4f} (length-normalised {res['accuracy_norm']:.4f})"
                  f" on {res['questions']} questions")
            notes = (
                (res["k_shot"] < args.k_shot, f"note: {args.k_shot} shots requested; {args.shots or 'the file'} has "
                                              f"only {res['k_shot']} other questions"),
                (res["questions_left_out"], f"note: {res['questions_left_out']} questions left out: a choice is "
                                            f"empty (the first: {res.get('first_left_out')})"),
                (res["questions_with_repeated_choices"], f"note: {res['questions_with_repeated_choices']} questions "
                                                         "repeat a choice; a pick equal to the answer's text counts"
                                                         " as right"),
                (res["questions_with_fewer_shots"], f"note: {res['questions_with_fewer_shots']} questions got fewer "
                                                    f"solved examples, to fit the model's max_seq_len "
                                                    f"{cfg.max_seq_len} (or for want of other questions)"),
                (res["questions_cut"], f"warning: {res['questions_cut']} questions are longer than max_seq_len "
                                       f"{cfg.max_seq_len} even without examples; each choice was scored after the "
                                       "same last tokens of its prompt (as many as its longest choice leaves)"))
            for shown, text in notes:
                if shown:
                    print(text)
        else:
            progress = Progress(None, what="answers scored", throttle=True)
            if args.seq_len and args.seq_len > cfg.max_seq_len:
                print(f"note: --seq_len {args.seq_len} is cut to the model's max_seq_len {cfg.max_seq_len}")
                args.seq_len = cfg.max_seq_len  # what is used, and what --output records
            res = reward_accuracy(cfg, params, tok, args.data, args.batch_size, progress.update, mesh,
                                  seq_len=args.seq_len, reference=reference)
            if reference is not None:
                print(f"DPO's implicit reward: log pi(y|x) - log ref(y|x), {args.checkpoint} against {args.reference}"
                      + (f" at step {ref_step}, the one the DPO run started from" if ref_step is not None else ""))
            progress.close()
            print(table8(res))
            cut_at = min(args.seq_len or cfg.max_seq_len, cfg.max_seq_len)
            print(f"{res['pairs']} pairs" + (f" ({res['pairs_left_out']} left out by the paper's filter, as in "
                                             "training)" if res["pairs_left_out"] else "")
                  + (f"; {res['ties']} scored equal both ways, counted wrong" if res["ties"] else "")
                  + (f"; {res['pairs_cut']} longer than {cut_at} tokens, cut as training cuts them (the same prompt "
                     "tokens off both sides, then the answer's end)" if res["pairs_cut"] else "")
                  + (f"; {res['pairs_same_once_cut']} of them the same tokens on both sides once cut"
                     + (" (a larger --seq_len tells them apart)" if cut_at < cfg.max_seq_len else "")
                     if res["pairs_same_once_cut"] else ""))
            if "unsafe_recall" in res:
                print(f"unsafe-response recall at 0.5: {res['unsafe_recall']:.3f} (of {res['unsafe_answers']} "
                      "answers labelled unsafe)")
        if args.output:
            settings = {k: v for k, v in vars(args).items() if k != "output"}
            with open(args.output, "x") as f:
                json.dump({**res, "settings": {**settings, "step": step}}, f, indent=1)
    except (ckpt.CheckpointError, TokenizerError, DataError, MeshError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
