import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, run

from llama_jax import checkpoint as ckpt
from llama_jax import evaluate as ev
from llama_jax import objectives
from llama_jax import tokenizer as tk
from llama_jax.data import preference, pretrain, synthetic
from llama_jax.model import Llama, LlamaConfig

CFG = LlamaConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, ffn_hidden_dim=80, max_seq_len=256)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [" ".join(random.Random(i).choice(synthetic.WORDS) for _ in range(10)) for i in range(300)]
    lines += [json.dumps(r) for r in synthetic.generate("preference", 50, 0)]
    (d / "c.txt").write_text("\n".join(lines + ["Question: Answer: 0123456789 ?!.,"] * 5))
    return tk.train([str(d / "c.txt")], CFG.vocab_size, str(d / "tok.model"))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, std=0.15, seed=4)


def full_logprob(params, ctx, cont):
    seq = np.array([list(ctx) + list(cont)])
    logp = np.asarray(jax.nn.log_softmax(run(Llama(CFG), params, seq)[0], axis=-1))
    return sum(logp[len(ctx) + i - 1, t] for i, t in enumerate(cont))


def lls(res):
    return [q["loglikelihoods"] for q in res["per_question"]]


def test_loglikelihood_equals_full_forward(params):
    ctxs = [[1, 5, 6, 7], [1, 9], [1, 3, 3, 3, 3, 3, 3, 3, 40]]
    conts = [[8, 9], [10, 11, 12, 13], [2]]
    got = ev.loglikelihood(CFG, params, ctxs, conts, batch_size=2)
    for (lp, _), c, t in zip(got, ctxs, conts):
        assert lp == pytest.approx(full_logprob(params, c, t), abs=1e-4)
    ctx = [1, 5, 6]
    greedy = int(np.argmax(run(Llama(CFG), params, np.array([ctx]))[0, -1]))
    assert ev.loglikelihood(CFG, params, [ctx], [[greedy]])[0][1] is True
    assert ev.loglikelihood(CFG, params, [ctx], [[(greedy + 1) % CFG.vocab_size]])[0][1] is False
    with pytest.raises(ValueError, match="pair 1 has an empty context"):  # its first token could not be scored
        ev.loglikelihood(CFG, params, [ctx, []], [[5], [5, 6]])
    # pairs that do not match, ids outside the vocabulary (NaN, or a wrapped id) and nothing to score: errors
    for cs, ts, words in (([ctx, ctx], [[5]], "2 contexts and 1 continuations"),
                          ([ctx], [[CFG.vocab_size]], f"continuation 0 has token id {CFG.vocab_size}, outside"),
                          ([[1, -3]], [[5]], "context 0 has token id -3, outside"),
                          ([ctx], [[]], "continuation 0: needs at least one token")):
        with pytest.raises(ValueError, match=f"loglikelihood: {words}"):
            ev.loglikelihood(CFG, params, cs, ts)
    with pytest.raises(ValueError, match=r"loglikelihood: params is a \{'params'"):
        ev.loglikelihood(CFG, {"params": params}, [ctx], [[5]])


def test_multiple_choice_scores_and_accuracy(tmp_path, tok, params):
    qs = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), "apple"], "answer": 0}
          for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in qs))
    res = ev.multiple_choice(CFG, params, tok, str(path), k_shot=0)
    # Each score is the log-likelihood of the choice after the prompt, by full forward passes.
    for q, lps in zip(qs, lls(res)):
        prompt = ev.mc_prompt(q, [])
        ctx = tok.encode(prompt, bos=True)
        for choice, lp in zip(q["choices"], lps):
            full = tok.encode(f"{prompt} {choice}", bos=True)
            assert full[:len(ctx)] == ctx
            assert lp == pytest.approx(full_logprob(params, ctx, full[len(ctx):]), abs=1e-4)
    # Re-key the answers to the model's own picks on half the questions: accuracy is exactly 0.5.
    picks = [int(np.argmax(lps)) for lps in lls(res)]
    assert picks == [q["pick"] for q in res["per_question"]]
    for q, lps in zip(qs, lls(res)):  # per character of the choice (lm-eval's acc_norm: the space not counted)
        per_char = [lp / len(c) for lp, c in zip(lps, q["choices"])]
        assert res["per_question"][qs.index(q)]["pick_norm"] == int(np.argmax(per_char))
    assert [q["where"] for q in res["per_question"]] == [f"{path}:{i}" for i in range(1, 5)]
    for i, q in enumerate(qs):
        q["answer"] = picks[i] if i % 2 == 0 else (picks[i] + 1) % 3
    path.write_text("\n".join(json.dumps(q) for q in qs))
    assert ev.multiple_choice(CFG, params, tok, str(path))["accuracy"] == 0.5
    shot = ev.mc_prompt(qs[0], qs[1:3])
    assert shot.count("Question:") == 3 and shot.endswith(f"Question: {qs[0]['question']}\nAnswer:")
    five = ev.multiple_choice(CFG, params, tok, str(path), k_shot=5)
    assert five["k_shot"] == 3 and five["k_shot_requested"] == 5  # only 3 other questions exist: 3 shots
    assert five["questions"] == 4
    limited = ev.multiple_choice(CFG, params, tok, str(path), k_shot=2, limit=1)  # shots from the whole file
    assert limited["questions"] == 1 and limited["k_shot"] == 2 and "k_shot_requested" not in limited
    assert five["questions_with_fewer_shots"] == five["questions_cut"] == 0

    # A model too short for 3 solved examples: each question keeps the last ones that fit
    # (the scores equal the 0-shot ones where none fit), never a prompt cut at its start.
    lengths = [max(len(tok.encode(f"{ev.mc_prompt(q, [])} {c}", bos=True)) for c in q["choices"]) for q in qs]
    short = CFG.replace(max_seq_len=max(lengths) + 4)  # room for no solved example
    fit = ev.multiple_choice(short, params, tok, str(path), k_shot=3)
    assert fit["questions_with_fewer_shots"] == 4 and fit["questions_cut"] == 0
    np.testing.assert_allclose(lls(fit), lls(res), atol=1e-4)
    tiny = CFG.replace(max_seq_len=min(lengths) - 2)
    cut = ev.multiple_choice(tiny, params, tok, str(path))
    assert cut["questions_cut"] == 4
    # too long even without examples: every choice is read after the same last tokens of the prompt, as many as
    # the longest choice ("apple" here) leaves (each cut on its own, a shorter choice read more of the prompt)
    for q, lps in zip(qs, lls(cut)):
        prompt = ev.mc_prompt(q, [])
        ctx = tok.encode(prompt, bos=True)
        conts = [tok.encode(f"{prompt} {c}", bos=True)[len(ctx):] for c in q["choices"]]
        room = tiny.max_seq_len - max(map(len, conts))
        for cont, lp in zip(conts, lps):
            assert lp == pytest.approx(full_logprob(params, ctx[-room:], cont), abs=1e-4)


def test_perplexity_matches_the_training_objective(tmp_path, tok, params):
    docs = tmp_path / "d.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(random.Random(i).choice(synthetic.WORDS)
                                                                 for _ in range(40))}) for i in range(30)))
    res = ev.perplexity(CFG, params, tok, f"jsonl:{docs}", seq_len=64, batch_size=3)
    batches = pretrain.make_dataset(f"jsonl:{docs}", tok, 64, 3, split="eval", prefetch=0, drop_remainder=False)
    total = weight = 0.0
    for b in batches:
        logits = np.asarray(run(Llama(CFG), params, b["tokens"], b["positions"], b["segment_ids"]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0]
        total, weight = total + (ce * b["loss_mask"]).sum(), weight + b["loss_mask"].sum()
    assert res["loss"] == pytest.approx(total / weight, rel=1e-5)
    assert res["perplexity"] == pytest.approx(np.exp(total / weight), rel=1e-5)
    docs_tokens = sum(len(tok.encode(json.loads(line)["text"], bos=True, eos=True)) for line in open(docs))
    rows = -(-docs_tokens // 64)
    assert rows % 3 and res["batches"] == -(-rows // 3)  # the last batch is partial, and scored
    # all of it: unscored are only each row's first token and each document's first (no context in its row)
    assert res["tokens"] == weight >= docs_tokens - rows - 30
    small = ev.perplexity(CFG, params, tok, f"jsonl:{docs}", seq_len=256, batch_size=64)  # less than a batch
    assert small["batches"] == 1 and small["tokens"] >= docs_tokens - -(-docs_tokens // 256) - 30


def test_reward_accuracy_per_rating_bucket(tmp_path, tok):
    rm = random_params(CFG, heads=("score",), std=0.15, seed=9)
    pairs = synthetic.generate("preference", 24, 1)
    path = tmp_path / "p.jsonl"
    synthetic.write_jsonl(pairs, str(path))
    res = ev.reward_accuracy(CFG, rm, tok, str(path))
    chosen = ev.score(CFG, rm, tok, [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}] for p in pairs])
    rejected = ev.score(CFG, rm, tok, [p["prompt"] + [{"role": "assistant", "content": p["rejected"]}]
                                       for p in pairs])
    assert res["accuracy"] == pytest.approx(float(np.mean(chosen > rejected)))
    for rating in ("significantly_better", "better", "slightly_better", "negligibly_better"):
        idx = [i for i, p in enumerate(pairs) if p["rating"] == rating]
        assert res[rating] == pytest.approx(float(np.mean((chosen > rejected)[idx])))
    # The score head reads the last token: a dialog alone scores like it does in a batch.
    alone = ev.score(CFG, rm, tok, [pairs[3]["prompt"] + [{"role": "assistant", "content": pairs[3]["chosen"]}]])
    assert alone[0] == pytest.approx(chosen[3], abs=1e-5)
    assert "significantly better | better | slightly better | negligibly better | avg" in ev.table8(res)
    assert not any(k.startswith("accuracy_") for k in res)  # these pairs name no task
    for i, p in enumerate(pairs):
        p["task"] = ("add", "sort", "copy")[i % 3]
    synthetic.write_jsonl(pairs, str(path))
    res = ev.reward_accuracy(CFG, rm, tok, str(path))
    for j, task in enumerate(("add", "sort", "copy")):  # the policy pairs' per-task accuracy
        assert res[f"accuracy_{task}"] == pytest.approx(float(np.mean((chosen > rejected)[j::3])))


def test_a_dpo_policy_is_scored_by_its_implicit_reward_as_training_scores_it(tmp_path, tok):
    """reward_accuracy with a reference (`evaluate --reference=`): DPO's implicit reward
    log pi - log ref decides; its accuracy equals the DPO objective's on the same pairs."""
    from llama_jax import objectives

    policy = random_params(CFG, std=0.15, seed=2)
    reference = random_params(CFG, std=0.15, seed=3)
    pairs = synthetic.generate("preference", 16, 4)
    path = tmp_path / "p.jsonl"
    synthetic.write_jsonl(pairs, str(path))
    res = ev.reward_accuracy(CFG, policy, tok, str(path), seq_len=128, reference=(CFG, reference, None))
    batch = next(preference.make_dataset(str(path), tok, 128, 16, shuffle=False, prefetch=0, num_epochs=1))
    model = Llama(CFG)

    def apply_fn(p, tokens, positions, segment_ids):
        return model.apply({"params": p}, tokens, positions, segment_ids)

    _, weight, m = objectives.dpo(apply_fn, policy, {k: jnp.asarray(v) for k, v in batch.items()}, frozen=reference,
                                  beta=1.0)
    assert res["pairs"] == 16 and res["accuracy"] == pytest.approx(float(m["accuracy"]) / float(weight))
    assert 0.0 < res["accuracy"] < 1.0 and "unsafe_recall" not in res  # random models: some right, some wrong
    # a DPO run that extended its reference's context: the reference scores the policy's rows at the policy's
    # context, as training did (it failed to fit rows longer than the reference's own context into its batch)
    short = dataclasses.replace(CFG, max_seq_len=32)
    longer = ev.reward_accuracy(CFG, policy, tok, str(path), seq_len=128, reference=(short, reference, None))
    assert longer["accuracy"] == res["accuracy"]


def test_mean_pooled_reward_scores_the_same_in_training_and_scoring(tmp_path, tok):
    # The ranking loss (preference batches) and `score` (RLHF rewards, evaluation) must read
    # the same answer tokens, or a mean-pooled RM is trained on one thing and used on another.
    cfg = dataclasses.replace(CFG, score_pooling="mean")
    rm = random_params(cfg, heads=("score",), std=0.15, seed=9)
    pairs = synthetic.generate("preference", 4, 2)
    pairs[1]["prompt"] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "apple river"},
                          *pairs[1]["prompt"]]  # an earlier answer is not scored
    path = tmp_path / "p.jsonl"
    synthetic.write_jsonl(pairs, str(path))
    batch = next(preference.make_dataset(str(path), tok, 128, 4, shuffle=False, prefetch=0))
    model, seen = Llama(cfg, ("score",)), {}

    def apply_fn(p, tokens, positions, segment_ids, score_mask=None):
        seen["scores"] = model.apply({"params": p}, tokens, positions, segment_ids, score_mask=score_mask)
        return seen["scores"]

    objectives.ranking(apply_fn, rm, {k: jnp.asarray(v) for k, v in batch.items()})
    scored = [ev.score(cfg, rm, tok, [p["prompt"] + [{"role": "assistant", "content": p[side]}] for p in pairs])
              for side in ("chosen", "rejected")]
    np.testing.assert_allclose(seen["scores"], np.concatenate(scored), atol=1e-4)
    last = ev.score(CFG, rm, tok, [pairs[0]["prompt"] + [{"role": "assistant", "content": pairs[0]["chosen"]}]])
    assert abs(float(last[0]) - float(scored[0][0])) > 1e-4  # the pooling is not the last token's


def test_evaluate_cli(tmp_path, tok, params, capsys):
    ckpt.save_params(str(tmp_path / "m"), params, {"model": CFG.to_dict(), "heads": ["lm"]}, tokenizer_path=tok.path)
    docs = tmp_path / "d.txt"
    docs.write_text(" ".join(random.Random(0).choice(synthetic.WORDS) for _ in range(400)))
    out = tmp_path / "res.json"
    assert ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=perplexity", f"--data=text:{docs}", "--seq_len=64",
                    "--batch_size=2", f"--output={out}"]) == 0
    assert "perplexity" in capsys.readouterr().out and json.loads(out.read_text())["tokens"] > 0
    full = json.loads(out.read_text())
    with pytest.raises(SystemExit):  # a results file is never overwritten
        ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=perplexity", f"--data=text:{docs}", f"--output={out}"])
    assert f"--output={out}: exists; choose a new file" in capsys.readouterr().err
    assert json.loads(out.read_text()) == full
    out = tmp_path / "res16.json"
    assert ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=perplexity", f"--data=text:{docs}", "--seq_len=64",
                    "--batch_size=2", f"--output={out}", "--dtype=bfloat16"]) == 0
    half = json.loads(out.read_text())  # the same tokens, scored by the bfloat16 model: near, not equal
    assert half["settings"]["dtype"] == "bfloat16" and half["tokens"] == full["tokens"]
    assert half["loss"] != full["loss"] and abs(half["loss"] - full["loss"]) < 0.02 * full["loss"]
    out = tmp_path / "res_long.json"
    assert ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=perplexity", f"--data=text:{docs}",
                    f"--seq_len={CFG.max_seq_len + 64}", "--batch_size=2", f"--output={out}"]) == 0
    assert f"is cut to the model's max_seq_len {CFG.max_seq_len}" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["seq_len"] == CFG.max_seq_len  # what was used
    # a run's workdir records the seq_len it trained at: the default (512 scored positions it never trained on)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"seq_len": 48, "stage": "pretrain"}))
    out = tmp_path / "res_run.json"
    assert ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=perplexity", f"--data=text:{docs}", "--batch_size=2",
                    f"--output={out}"]) == 0
    assert f"--seq_len 48: the length {tmp_path / 'm'} trained at" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["seq_len"] == 48
    assert ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=reward_accuracy", f"--data={docs}"]) == 2
    assert "needs a 'score' head" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    synthetic.write_jsonl(synthetic.generate("preference", 6, 1), str(pairs))
    ckpt.save_params(str(tmp_path / "dpo"), random_params(CFG, std=0.15, seed=5),
                     {"model": CFG.to_dict(), "heads": ["lm"], "stage": "dpo",
                      "init_from": {"path": str(tmp_path / "m"), "step": 0}}, tokenizer_path=tok.path)
    assert ev.main([f"--checkpoint={tmp_path / 'dpo'}", "--task=reward_accuracy", f"--data={pairs}"]) == 2
    assert "(a DPO policy is scored against its reference: evaluate --reference=ITS_INIT_FROM)" in \
        capsys.readouterr().err
    from llama_jax import generate as gen

    loads = []
    real_load = gen.load_on_local_devices

    def load(path, step, *a, **k):
        loads.append((str(path), step))
        return real_load(path, step, *a, **k)

    gen.load_on_local_devices = load
    try:
        assert ev.main([f"--checkpoint={tmp_path / 'dpo'}", "--task=reward_accuracy", f"--data={pairs}",
                        f"--reference={tmp_path / 'm'}"]) == 0
    finally:
        gen.load_on_local_devices = real_load
    assert loads[1] == (str(tmp_path / "m"), 0)  # the reference at the step the run recorded, not its latest
    printed = capsys.readouterr().out
    assert "DPO's implicit reward: log pi(y|x) - log ref(y|x)" in printed and "| accuracy |" in printed
    assert "at step 0, the one the DPO run started from" in printed  # the recorded step of its init_from
    assert ev.main([f"--checkpoint={tmp_path / 'dpo'}", "--task=reward_accuracy", f"--data={pairs}",
                    f"--reference={tmp_path / 'dpo'}"]) == 0  # another model than the run's reference: said
    assert f"warning: --reference={tmp_path / 'dpo'} is not {tmp_path / 'dpo'}'s reference, {tmp_path / 'm'} " \
        "(step 0)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}))
    assert ev.main([f"--checkpoint={tmp_path / 'm'}", "--task=multiple_choice", f"--data={bad}"]) == 2
    assert "bad.jsonl:1: 'answer' must be an index into choices (0..1)" in capsys.readouterr().err
    # a tokenizer larger than the model's vocabulary would read past the embedding (NaN scores)
    small = {**params, "tok_embeddings": {"embedding": params["tok_embeddings"]["embedding"][:300]},
             "output": params["output"][:, :300]}
    ckpt.save_params(str(tmp_path / "s"), small, {"model": CFG.replace(vocab_size=300).to_dict(), "heads": ["lm"]},
                     tokenizer_path=tok.path)
    assert ev.main([f"--checkpoint={tmp_path / 's'}", "--task=perplexity", f"--data=text:{docs}"]) == 2
    assert f"tokenizer vocabulary {tok.vocab_size} is larger than the checkpoint vocab_size 300" in \
        capsys.readouterr().err


def test_reward_models_on_a_runs_mesh_score_like_their_own_copy(tmp_path, tok):
    # PPO keeps its reward models on the run's one mesh, sharded like the policy (data x
    # fsdp x tensor here), instead of a copy per process: the scores must not change.
    from llama_jax import rlhf, sharding

    safety_rm = random_params(CFG, heads=("score",), std=0.15, seed=4)
    for name, params in (("rm", random_params(CFG, heads=("score",), std=0.15, seed=3)), ("safety", safety_rm)):
        ckpt.save_params(str(tmp_path / name), params, {"model": CFG.to_dict(), "heads": ["score"]},
                         tokenizer_path=tok.path)
    pairs = synthetic.generate("preference", 40, 5)  # 80 dialogs: 3 batches of 32, the last one short
    dialogs = [p["prompt"] + [{"role": "assistant", "content": p[s]}] for p in pairs for s in ("chosen", "rejected")]
    tagged = [i % 3 == 0 for i in range(len(dialogs))]
    own = rlhf.RewardModels(str(tmp_path / "rm"), str(tmp_path / "safety"), tok)(dialogs, tagged)
    mesh = sharding.make_mesh(2, 2, 2)
    on_mesh = rlhf.RewardModels(str(tmp_path / "rm"), str(tmp_path / "safety"), tok, mesh=mesh,
                                rules=sharding.DEFAULT_RULES)
    _, params, _, held_on = on_mesh.models["helpful"]
    assert held_on is mesh
    specs = {leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(params)}
    assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
    scored = on_mesh(dialogs, tagged)
    for k in ("helpful", "safety", "gated"):
        np.testing.assert_allclose(scored[k], own[k], atol=2e-5)
    assert len(set(np.round(scored["gated"], 4))) > 10  # real, varied scores, not a constant


def test_evaluation_inputs_a_result_would_silently_mislead_on(tmp_path, tok, params, capsys):
    """An empty choice (scored on the prompt's space alone, it wins) and repeated choices
    are data errors naming the line; another line asking the same question is no solved
    example for it; reward accuracy says how many pairs the filter left out and how many
    tied; flags that do not apply, bad values and an --output that cannot be written are
    refused before any evaluation; --output records the settings; progress is shown."""
    m = str(tmp_path / "m")
    ckpt.save_params(m, params, {"model": CFG.to_dict(), "heads": ["lm"]}, tokenizer_path=tok.path)
    # (MMLU's test split has both: a line with an empty choice is left out and named, repeated choices scored)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                  + json.dumps({"question": "r", "choices": ["def", " "], "answer": 0}) + "\n"
                  + json.dumps({"question": "s", "choices": ["class", "x", "class"], "answer": 2}) + "\n")
    assert ev.main([f"--checkpoint={m}", "--task=multiple_choice", f"--data={mc}", "--k_shot=1"]) == 0
    printed = capsys.readouterr().out
    assert f"note: 1 questions left out: a choice is empty (the first: {mc}:2)" in printed
    assert "on 2 questions" in printed and "note: 1 questions repeat a choice" in printed
    res = ev.multiple_choice(CFG, params, tok, str(mc), k_shot=1)
    assert res["questions_left_out"] == 1 and res["questions_with_repeated_choices"] == 1
    assert all(" r\n" not in p for p in ev.mc_prompt({"question": "x", "choices": ["1", "2"], "answer": 0}, []))
    repeat = res["per_question"][1]
    assert repeat["where"] == f"{mc}:3" and repeat["loglikelihoods"][0] == repeat["loglikelihoods"][2]
    assert repeat["pick"] in (0, 2) or res["accuracy"] < 1  # the first of two equal scores: right by its text
    if repeat["pick"] == 0:
        assert (res["accuracy"] * 2) % 1 == 0 and res["per_question"][1]["answer"] == 2
    mc.write_text(json.dumps({"question": "q", "choices": ["", "b"], "answer": 1}) + "\n")
    assert ev.main([f"--checkpoint={m}", "--task=multiple_choice", f"--data={mc}"]) == 2
    assert f"{mc}:1: a choice is empty, as in every question; nothing to score" in capsys.readouterr().err
    for answer, words in (("class", "'answer' 'class' is 2 of the choices; give its index"),
                          ("1", 'an index is a JSON number: "answer": 1, not "1"'),
                          ("B", 'for a letter key, give its index: "answer": 1')):
        mc.write_text(json.dumps({"question": "q", "choices": ["class", "x", "class"], "answer": answer}) + "\n")
        assert ev.main([f"--checkpoint={m}", "--task=multiple_choice", f"--data={mc}"]) == 2
        assert f"{mc}:1: " in (err := capsys.readouterr().err) and words in err, err
    same = [{"question": "What is 1 + 2?", "choices": ["3", "4"], "answer": 0}] * 3 + \
        [{"question": "What is 5 + 6?", "choices": ["11", "12"], "answer": 0}]
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(q) + "\n" for q in same))
    res = ev.multiple_choice(CFG, params, tok, str(tmp_path / "same.jsonl"), k_shot=2)
    assert res["questions_with_fewer_shots"] == 3  # the three repeats have one other question to show
    # reward accuracy: one pair dropped by the paper's filter (unsafe chosen, safe rejected), one tie
    rm = random_params(CFG, heads=("score",), std=0.15, seed=9)
    pairs = synthetic.generate("preference", 6, 1)
    pairs[0] = {**pairs[0], "chosen_safe": False, "rejected_safe": True}
    pairs[1] = {**pairs[1], "rejected": pairs[1]["chosen"]}
    synthetic.write_jsonl(pairs, str(tmp_path / "p.jsonl"))
    out = ev.reward_accuracy(CFG, rm, tok, str(tmp_path / "p.jsonl"))
    assert out["pairs"] == 5 and out["pairs_left_out"] == 1 and out["ties"] == 1
    # the CLI
    docs = tmp_path / "d.txt"
    docs.write_text(" ".join(random.Random(0).choice(synthetic.WORDS) for _ in range(400)))
    base = [f"--checkpoint={m}", "--task=perplexity", f"--data=text:{docs}"]
    (tmp_path / "dir.json").mkdir()
    for extra, words in ((["--k_shot=3"], "--k_shot: not used by --task=perplexity"),
                         (["--seed=1", "--style=qa"], "--style, --seed: not used by --task=perplexity"),
                         ([f"--output={tmp_path / 'dir.json'}"], "dir.json: a directory; give a file name"),
                         (["--seq_len=0"], "--seq_len must be >= 2, got 0"),
                         (["--output=/nonexistent/x.json"], "--output=/nonexistent/x.json: its directory does not")):
        with pytest.raises(SystemExit) as e:
            ev.main(base + extra)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert ev.main([f"--checkpoint={m}", "--task=perplexity", "--data=synthetic"]) == 2
    assert "give --max_batches" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert ev.main(base + ["--seq_len=64", "--batch_size=2", "--max_batches=2", f"--output={out}"]) == 0
    printed = capsys.readouterr()
    assert "tokens, the first 2 batches)" in printed.out and "batches 2/2" in printed.err
    saved = json.loads(out.read_text())
    assert saved["batches"] == 2 and saved["settings"]["max_batches"] == 2 and saved["settings"]["step"] == 0


def test_a_dialog_longer_than_the_context_is_scored_as_training_reads_it(tmp_path, tok):
    """Scoring cuts a long dialog as the preference pipeline cuts a pair: BOS kept, the
    prompt's first tokens dropped down to its last max_seq_len // 2 (it used to keep the
    last max_seq_len tokens, BOS lost); reward accuracy counts the pairs it cut."""
    from llama_jax.data import preference

    rm = random_params(CFG, heads=("score",), std=0.15, seed=9)
    short = CFG.replace(max_seq_len=64)
    prompt = [{"role": "user", "content": " ".join(synthetic.WORDS[i % len(synthetic.WORDS)] for i in range(80))}]
    answer = "the answer is here"
    (tokens, mask), _ = preference._EncodePair(tok, 64, "small").sides(prompt, answer, answer)
    assert tokens[0] == tok.bos_id and len(tokens) == 64
    seg = np.ones((1, 64), np.int32)
    want = ev._scores(rm, jnp.asarray([tokens]), jnp.asarray(seg), jnp.asarray([mask], jnp.float32), config=short)
    got = ev.score(short, rm, tok, [prompt + [{"role": "assistant", "content": answer}]])
    assert got[0] == pytest.approx(float(np.asarray(want)[0]), abs=1e-5)
    pairs = [{"prompt": prompt, "chosen": answer, "rejected": "no", "rating": "better"},
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b", "rating": "better"}]
    synthetic.write_jsonl(pairs, str(tmp_path / "long.jsonl"))
    assert ev.reward_accuracy(short, rm, tok, str(tmp_path / "long.jsonl"))["pairs_cut"] == 1
    # a pair is cut as a pair, at the run's seq_len: the same prompt tokens off both sides (cutting each answer's
    # dialog on its own read the two answers after different contexts)
    pairs[0]["rejected"] = "no, " + " ".join(synthetic.WORDS[:12])
    synthetic.write_jsonl(pairs, str(tmp_path / "long.jsonl"))
    seen = []
    real = ev.score_rows

    def spy(config, params, rows, *args, **kwargs):
        seen.append(list(rows))
        return real(config, params, rows, *args, **kwargs)

    ev.score_rows = spy
    try:
        res = ev.reward_accuracy(CFG, rm, tok, str(tmp_path / "long.jsonl"), seq_len=48)
    finally:
        ev.score_rows = real
    want = [preference._EncodePair(tok, 48, "none").sides(r["prompt"], r["chosen"], r["rejected"]) for r in pairs]
    assert seen == [[w[0] for w in want], [w[1] for w in want]] and res["pairs_cut"] == 1
    chosen, rejected = want[0]
    start = chosen[1].index(True)  # one context, cut the same, before both answers
    assert len(rejected[0]) == 48 and len(chosen[0]) < 48 and chosen[0][:start] == rejected[0][:start]
    head = " ".join(synthetic.WORDS[i % len(synthetic.WORDS)] for i in range(70)) + " "
    pairs.append({"prompt": [{"role": "user", "content": "q"}], "chosen": head + "yes", "rejected": head + "no"})
    synthetic.write_jsonl(pairs, str(tmp_path / "long.jsonl"))
    res = ev.reward_accuracy(CFG, rm, tok, str(tmp_path / "long.jsonl"), seq_len=48)
    assert res["pairs_same_once_cut"] == 1 and res["pairs_cut"] == 2  # its answers differ after a long start
    # a dialog whose answer alone is too long keeps BOS and its prompt, and the answer's start
    seen.clear()
    ev.score_rows = spy
    try:
        ev.score(short, rm, tok, [[{"role": "user", "content": "q"}, {"role": "assistant", "content": head * 2}]])
    finally:
        ev.score_rows = real
    (row, mask), = seen[0]
    assert row[0] == tok.bos_id and len(row) == 64 and row[1:mask.index(True)] == \
        tok.encode_dialog([{"role": "user", "content": "q"}])[1:]
    # unsafe-response recall says how many answers it is of
    p = [{"role": "user", "content": "q"}]
    synthetic.write_jsonl([{"prompt": p, "chosen": "a", "rejected": "b", "chosen_safe": True, "rejected_safe": False},
                           {"prompt": p, "chosen": "c", "rejected": "d", "chosen_safe": False,
                            "rejected_safe": False}], str(tmp_path / "s.jsonl"))
    assert ev.reward_accuracy(CFG, rm, tok, str(tmp_path / "s.jsonl"))["unsafe_answers"] == 3


def test_evaluate_loads_a_model_over_every_local_device(tmp_path, tok, params, capsys):
    """The evaluate CLI loads a checkpoint split over the host's devices (fsdp), as
    generate and chat do, and scores what one device scores."""
    from llama_jax.generate import load_on_local_devices

    m, rm_dir = str(tmp_path / "m"), str(tmp_path / "rm")
    ckpt.save_params(m, params, {"model": CFG.to_dict(), "heads": ["lm"]}, tokenizer_path=tok.path)
    rm = random_params(CFG, heads=("score",), std=0.15, seed=9)
    ckpt.save_params(rm_dir, rm, {"model": CFG.to_dict(), "heads": ["score"]}, tokenizer_path=tok.path)
    cfg, split, _, _, mesh = load_on_local_devices(m)
    assert mesh.size == jax.device_count() == 8
    assert len(split["output"].sharding.device_set) == 8  # not a copy on device 0
    docs = tmp_path / "d.txt"
    docs.write_text(" ".join(random.Random(0).choice(synthetic.WORDS) for _ in range(400)))
    one = ev.perplexity(CFG, params, tok, f"text:{docs}", 64, 2)
    assert ev.perplexity(cfg, split, tok, f"text:{docs}", 64, 2)["loss"] == pytest.approx(one["loss"], abs=1e-5)
    pairs = synthetic.generate("preference", 8, 1)
    synthetic.write_jsonl(pairs, str(tmp_path / "p.jsonl"))
    want = ev.reward_accuracy(CFG, rm, tok, str(tmp_path / "p.jsonl"))
    assert ev.main([f"--checkpoint={rm_dir}", "--task=reward_accuracy", f"--data={tmp_path / 'p.jsonl'}",
                    f"--output={tmp_path / 'r.json'}"]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["accuracy"] == want["accuracy"] and got["pairs"] == 8 and "| avg |" in capsys.readouterr().out


def test_mmlu_layout_with_a_dev_split_of_solved_examples(tmp_path, tok, params):
    """--style=letters scores each choice's letter after the lettered question (MMLU's
    layout, with its subject line); --shots draws the solved examples from another file,
    of the question's own subject where there are some; batches of any lengths compile a
    handful of shapes."""
    subjects = ("high_school_math", "anatomy")
    test = [{"question": f"What is {a} + {a}?", "choices": [str(2 * a), str(a), "apple", "pear"], "answer": 0,
             "subject": subjects[a % 2]} for a in range(4)]
    dev = [{"question": f"Dev {s} {i}?", "choices": ["yes", "no"], "answer": i % 2, "subject": s}
           for s in subjects for i in range(3)] + [{"question": "No subject?", "choices": ["a", "b"], "answer": 0}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in test))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in dev))
    prompt = ev.mc_prompt(test[1], [dev[0]], style="letters")
    assert prompt == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                      "Dev high_school_math 0?\nA. yes\nB. no\nAnswer: A\n\n"
                      "What is 1 + 1?\nA. 2\nB. 1\nC. apple\nD. pear\nAnswer:")
    res = ev.multiple_choice(CFG, params, tok, str(tmp_path / "test.jsonl"), k_shot=2, style="letters",
                             shots_path=str(tmp_path / "dev.jsonl"), seed=3)
    assert res["k_shot"] == 2 and res["questions_with_fewer_shots"] == 0 and res["style"] == "letters"
    for q, per in zip(test, res["per_question"]):  # each score is the letter's log-probability after the prompt
        rng = random.Random(3)  # the shots the evaluation drew, in its order: same-subject dev lines
        for earlier in test[:test.index(q)]:
            rng.sample([d for d in dev if d.get("subject") == earlier["subject"]], 2)
        shots = rng.sample([d for d in dev if d.get("subject") == q["subject"]], 2)
        text = ev.mc_prompt(q, shots, style="letters")
        assert text.count(f"Dev {q['subject']}") == 2 and "Dev " + subjects[1 - test.index(q) % 2] not in text
        ctx = tok.encode(text, bos=True)
        for letter, lp in zip("ABCD", per["loglikelihoods"]):
            full = tok.encode(f"{text} {letter}", bos=True)
            assert full[:len(ctx)] == ctx
            assert lp == pytest.approx(full_logprob(params, ctx, full[len(ctx):]), abs=1e-4)
        assert per["pick_norm"] == per["pick"]  # every letter is 2 characters
    m = str(tmp_path / "m")  # the CLI passes --shots and --style on, and refuses a --shots file that is not there
    ckpt.save_params(m, params, {"model": CFG.to_dict(), "heads": ["lm"]}, tokenizer_path=tok.path)
    out = tmp_path / "r.json"
    assert ev.main([f"--checkpoint={m}", "--task=multiple_choice", f"--data={tmp_path / 'test.jsonl'}",
                    f"--shots={tmp_path / 'dev.jsonl'}", "--style=letters", "--k_shot=2", "--seed=3",
                    f"--output={out}"]) == 0
    saved = json.loads(out.read_text())
    assert saved["style"] == "letters" and saved["accuracy"] == res["accuracy"] and saved["k_shot"] == 2
    with pytest.raises(SystemExit):
        ev.main([f"--checkpoint={m}", "--task=multiple_choice", f"--data={tmp_path / 'test.jsonl'}",
                 f"--shots={tmp_path / 'nope.jsonl'}"])
    many = {"question": "q", "choices": [str(i) for i in range(27)], "answer": 0}
    (tmp_path / "many.jsonl").write_text(json.dumps(many) + "\n")
    with pytest.raises(ev.DataError, match="many.jsonl:1: more than 26 choices cannot be lettered"):
        ev.multiple_choice(CFG, params, tok, str(tmp_path / "many.jsonl"), style="letters")
    # raw benchmark layouts are named, with what to write instead
    for name, raw, words in (("arc", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                      "answerKey": "B"}, "'choices' is ARC's layout"),
                             ("hellaswag", {"ctx": "c", "endings": ["a", "b"], "label": "1"}, "HellaSwag's layout")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(raw) + "\n")
        with pytest.raises(ev.DataError, match=f"{name}.jsonl:1: {words}"):
            ev.multiple_choice(CFG, params, tok, str(tmp_path / f"{name}.jsonl"))
    # 60 pairs of lengths 3..180 in batches of 4, longest first: 6 shapes (32 .. 192), each pair's own score
    ctxs = [[1] + [5 + i % 50] * (i * 3) for i in range(60)]
    conts = [[7, 8]] * 60
    before = ev._row_logprobs._cache_size()
    got = ev.loglikelihood(CFG, params, ctxs, conts, batch_size=4)
    assert ev._row_logprobs._cache_size() - before <= 6
    assert [ev._length_bucket(n) for n in (1, 33, 256, 257, 513, 4000)] == [32, 64, 256, 320, 640, 4096]
    for i in (0, 17, 59):
        assert got[i][0] == pytest.approx(full_logprob(params, ctxs[i], conts[i]), abs=1e-4)


def test_picks_by_text_and_per_character_as_lm_eval(tmp_path, tok, params, monkeypatch):
    """A repeated choice equal to the answer's text counts as right whichever copy is
    picked; accuracy_norm divides by the choice's characters, its space not counted
    (lm-evaluation-harness's acc_norm)."""
    qs = [{"question": "q1", "choices": ["a", "abc"], "answer": 0},
          {"question": "q2", "choices": ["class", "x", "class"], "answer": 2}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    scores = [(-2.0, False), (-4.2, False), (-1.0, False), (-5.0, False), (-1.0, False)]
    monkeypatch.setattr(ev, "loglikelihood", lambda *a, **k: scores)
    res = ev.multiple_choice(CFG, params, tok, str(tmp_path / "mc.jsonl"))
    assert res["per_question"][0]["pick"] == 0 and res["per_question"][0]["pick_norm"] == 1  # -4.2/3 > -2/1
    assert res["per_question"][1]["pick"] == 0 and res["accuracy"] == 1.0 and res["accuracy_norm"] == 0.5


def test_empty_choices_teach_nothing_as_solved_examples(tmp_path, tok, params):
    """A line with an empty choice is neither scored nor drawn as a solved example."""
    clean = [{"question": f"What is {a}?", "choices": [str(a), "no"], "answer": 0} for a in range(3)]
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(q) + "\n" for q in clean))
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(q) + "\n" for q in clean[:1] + [
        {"question": "Empty?", "choices": ["", "b"], "answer": 1}] + clean[1:]))
    for seed in range(3):
        np.testing.assert_allclose(
            lls(ev.multiple_choice(CFG, params, tok, str(tmp_path / "mixed.jsonl"), k_shot=1, seed=seed)),
            lls(ev.multiple_choice(CFG, params, tok, str(tmp_path / "clean.jsonl"), k_shot=1, seed=seed)), atol=1e-5)


def test_continuation_style_scores_each_ending_after_the_context(tmp_path, tok, params):
    """--style=continuation (HellaSwag): the question's text is the context as it is, each
    choice the text that follows it; solved examples are context and right ending."""
    qs = [{"question": f"The cat sat on the {w}", "choices": ["mat.", "moon and sang.", "42"], "answer": 0}
          for w in ("red", "old", "new")]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    assert ev.mc_prompt(qs[0], qs[1:2], style="continuation") == "The cat sat on the old mat.\n\nThe cat sat on the red"
    res = ev.multiple_choice(CFG, params, tok, str(tmp_path / "hs.jsonl"), style="continuation")
    for q, per in zip(qs, res["per_question"]):
        ctx = tok.encode(q["question"], bos=True)
        for choice, lp in zip(q["choices"], per["loglikelihoods"]):
            full = tok.encode(f"{q['question']} {choice}", bos=True)
            n = len(ctx)
            while full[:n] != ctx[:n]:
                n -= 1
            assert lp == pytest.approx(full_logprob(params, full[:n], full[n:]), abs=1e-4)
    assert res["style"] == "continuation" and res["questions"] == 3


def test_library_calls_with_the_wrong_shape_of_input_say_so(tok, params):
    """What a notebook user passes by mistake: a list of texts to encode (SentencePiece
    returned a list of lists, silently), one dialog where a list of dialogs is wanted (an
    'empty dialog' error), a tokenizer where the safety RM's path goes (an os.stat error)."""
    from llama_jax import rlhf
    from llama_jax.tokenizer import DialogError

    with pytest.raises(TypeError, match="Tokenizer.encode: text must be a str, got list"):
        tok.encode(["ab", "cd"], bos=True)
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(ValueError, match=r"score: dialogs is a list of dialogs .* pass \[dialog\]"):
        ev.score(CFG, params, tok, dialog)
    with pytest.raises(DialogError, match=r"not one dict: pass record\['messages'\]"):
        tok.encode_dialog({"messages": dialog[:1]})
    with pytest.raises(TypeError, match="RewardModels: safety is a reward model's path .* pass the tokenizer as "
                                        "tokenizer="):
        rlhf.RewardModels("rm", tok)
    rms = object.__new__(rlhf.RewardModels)  # its flags are checked before any model scores
    rms.models = {}
    with pytest.raises(ValueError, match=r"is_safety: give one True/False a dialog \(2 dialogs\)"):
        rms([dialog, dialog], True)
