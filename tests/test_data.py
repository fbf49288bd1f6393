import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest

from llama_jax import tokenizer as tk
from llama_jax.data import chat, preference, prepare, pretrain, prompts, sources, synthetic
from llama_jax.data.pipeline import lm_example
from llama_jax.data.sources import DataError, StdlibCorpus

WORDS = synthetic.WORDS


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    recs = synthetic.generate("chat", 200, 0) + synthetic.generate("preference", 100, 0)
    lines += [json.dumps(r) for r in recs]  # chat tags and digits in the vocabulary
    (d / "corpus.txt").write_text("\n".join(lines))
    return tk.train([str(d / "corpus.txt")], 500, str(d / "tok.model"))


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rng = random.Random(1)
    for i in range(23):  # documents of very different lengths: some span several windows
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))))
    return d


def collect(batches, n):
    return [next(batches) for _ in range(n)]


def pieces(rows):
    """(tokens, positions, first_in_row, ends_row) of every segment of every row, in order."""
    out = []
    for row in rows:
        seg = row["segment_ids"]
        ids = [s for s in dict.fromkeys(seg.tolist()) if s > 0]  # in order of appearance
        for k, s in enumerate(ids):
            idx = np.nonzero(seg == s)[0]
            assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
            out.append((row["tokens"][idx], row["positions"][idx], k == 0, idx[-1] == len(seg) - 1))
    return out


def split_at_bos(stream):
    bos = [i for i, t in enumerate(stream) if t == tk.BOS_ID] + [len(stream)]
    return [tuple(stream[a:b]) for a, b in zip(bos, bos[1:])]


def unbatch(batches):
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["tokens"]))]


# ---------------------------------------------------------------- pretraining ---

def test_pretrain_packing_loses_no_token_and_never_mixes_documents(tok, docs_dir):
    docs = pretrain.open_documents(f"text:{docs_dir}/*.txt")
    expected = Counter(tuple(tok.encode(docs[i], bos=True, eos=True)) for i in range(len(docs)))
    total = sum(len(d) * n for d, n in expected.items())
    seq = 16
    rows = unbatch(collect(pretrain.make_dataset(f"text:{docs_dir}/*.txt", tok, seq, 1, seed=3, num_epochs=1,
                                                 prefetch=0), total // seq))
    segs = pieces(rows)
    for (tokens, pos, first, _), prev in zip(segs[1:], segs[:-1]):
        # One document per segment: BOS only at a segment's start, EOS only at its end.
        assert tk.BOS_ID not in tokens[1:].tolist() and tk.EOS_ID not in tokens[:-1].tolist()
        if tokens[0] != tk.BOS_ID:  # the rest of a document cut at the previous row's end
            assert first and prev[3] and prev[0][-1] != tk.EOS_ID
        np.testing.assert_array_equal(pos, np.arange(len(pos)))
    stream = np.concatenate([s[0] for s in segs])
    got = Counter(split_at_bos(stream.tolist()))
    # Every document arrives whole except possibly the last one, cut by the final window.
    assert sum((expected - got).values()) <= 1 and sum((got - expected).values()) <= 1
    assert len(stream) >= total - seq


def test_lm_example_masks_across_segments_and_padding():
    ex = lm_example(np.array([1, 5, 6, 2, 1, 7, 0, 0]), np.ones(8, bool), np.array([1, 1, 1, 1, 2, 2, 0, 0]),
                    np.array([0, 1, 2, 3, 0, 1, 0, 0]))
    np.testing.assert_array_equal(ex["targets"][:6], [5, 6, 2, 1, 7, 0])
    # Position 3 (EOS) would predict the next document's BOS; 5 predicts padding; 7 is last.
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 0, 1, 0, 0, 0])


def test_restoring_mid_epoch_yields_the_identical_remaining_batches(tok, docs_dir, tmp_path):
    chat_file = tmp_path / "chat.jsonl"
    synthetic.write_jsonl(synthetic.generate("chat", 120, 5), str(chat_file))
    pref_file = tmp_path / "pref.jsonl"
    synthetic.write_jsonl(synthetic.generate("preference", 60, 5), str(pref_file))
    makers = [
        lambda: pretrain.make_dataset(f"text:{docs_dir}/*.txt", tok, 16, 3, seed=7),  # with prefetch
        lambda: chat.make_dataset(str(chat_file), tok, 48, 4, seed=7),
        lambda: chat.make_dataset(str(chat_file), tok, 48, 4, seed=7, pack=False),
        lambda: preference.make_dataset(str(pref_file), tok, 40, 4, seed=7),
    ]
    for make in makers:
        it = make()
        collect(it, 5)  # mid-epoch (and, for the small sets, past one epoch)
        state = json.loads(json.dumps(it.state()))  # the state is plain JSON
        expected = collect(it, 6)
        resumed = make()
        resumed.restore(state)
        for a, b in zip(expected, collect(resumed, 6)):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        fresh = collect(make(), 11)[5:]  # and the same as an uninterrupted run
        np.testing.assert_array_equal(fresh[0]["tokens" if "tokens" in fresh[0] else "chosen_tokens"],
                                      expected[0]["tokens" if "tokens" in expected[0] else "chosen_tokens"])


def test_two_processes_see_disjoint_shards(tok, docs_dir):
    seen = []
    for index in range(2):
        rows = unbatch(collect(pretrain.make_dataset(f"text:{docs_dir}/*.txt", tok, 4096, 1, num_epochs=1,
                                                     shard=(index, 2), prefetch=0), 1))
        seen.append(set(split_at_bos(np.concatenate([p[0] for p in pieces(rows)]).tolist())))
    docs = pretrain.open_documents(f"text:{docs_dir}/*.txt")
    all_docs = {tuple(tok.encode(docs[i], bos=True, eos=True)) for i in range(len(docs))}
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_docs


def test_prepared_shards_feed_the_same_documents(tok, docs_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    assert prepare.main([f"--source=text:{docs_dir}/*.txt", f"--tokenizer={tok.path}", f"--output={out}",
                         "--num_shards=3"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["documents"] == 23 and len(meta["shards"]) == 3 and meta["tokenizer"] == tok.identity()
    shards = pretrain.open_documents(f"shards:{out}")
    docs = pretrain.open_documents(f"text:{docs_dir}/*.txt")
    assert Counter(tuple(shards[i]) for i in range(len(shards))) == Counter(
        tuple(tok.encode(docs[i], bos=True, eos=True)) for i in range(len(docs)))
    batch = next(pretrain.make_dataset(f"shards:{out}", tok, 16, 2))
    assert batch["tokens"].shape == (2, 16)
    assert prepare.main([f"--source=text:{docs_dir}/*.txt", f"--tokenizer={tok.path}", f"--output={out}"]) == 2
    assert "already holds prepared shards" in capsys.readouterr().err
    # an interrupted run's shards (finished or not; no metadata.json) are removed by the next, not listed beside it
    again = tmp_path / "again"
    again.mkdir()
    for name in ("tokens-00000-of-00002.array_record", "tokens-00001-of-00002.array_record.tmp", "notes.txt"):
        (again / name).write_text("x")
    assert prepare.main([f"--source=text:{docs_dir}/*.txt", f"--tokenizer={tok.path}", f"--output={again}",
                         "--num_shards=3"]) == 0
    assert "removing 2 shard files of an interrupted run" in capsys.readouterr().err
    assert sorted(os.listdir(again)) == sorted(meta["shards"] + ["metadata.json", "notes.txt"])
    # a text corpus with an empty file and one not in UTF-8: both said, and recorded in metadata.json
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("plain text " * 50)
    (mixed / "b.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    (mixed / "c.txt").write_text("")
    assert prepare.main([f"--source=text:{mixed}/*.txt", f"--tokenizer={tok.path}", f"--output={tmp_path}/m"]) == 0
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert meta["documents"] == 2 and meta["empty_files"] == 1 and meta["not_utf8_files"] == [f"{mixed}/b.txt"]
    assert "note: 1 empty file left out" in err and "warning: 1 file had bytes that are not UTF-8" in err
    assert re.search(r"MB ([\d.]+)/\1 \| documents 2 \|", err), err  # progress in MB of the source
    # a failure part-way (a file gone, a full disk): no shard files left behind, and the --output it made removed

    class Failing:
        def __init__(self):
            self.calls = 0

        def encode(self, text, bos, eos):
            self.calls += 1
            if self.calls == 2:
                raise OSError(28, "No space left on device")
            return tok.encode(text, bos=bos, eos=eos)

        def identity(self):
            return tok.identity()

    with pytest.raises(OSError, match="No space left"):
        prepare.prepare(f"text:{docs_dir}/*.txt", Failing(), str(tmp_path / "failed"), 3)
    assert not os.path.exists(tmp_path / "failed")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("x")
    with pytest.raises(OSError, match="No space left"):
        prepare.prepare(f"text:{docs_dir}/*.txt", Failing(), str(tmp_path / "kept"), 3)
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]  # a directory it did not make stays, without its shards
    (tmp_path / "empty_out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        prepare.prepare(f"text:{docs_dir}/*.txt", Failing(), str(tmp_path / "empty_out"), 3)
    assert os.listdir(tmp_path / "empty_out") == []  # made by the user: kept, empty

    class Interrupted(Failing):  # Ctrl-C part-way cleans up the same
        def encode(self, text, bos, eos):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(f"text:{docs_dir}/*.txt", Interrupted(), str(tmp_path / "failed"), 3)
    assert not os.path.exists(tmp_path / "failed")
    for bad, needle in (("{", "metadata.json: invalid JSON"), ('{"documents": 3}', 'needs a "shards" list')):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "metadata.json").write_text(bad)
        with pytest.raises(DataError, match=needle):
            pretrain.open_documents(f"shards:{tmp_path / 'bad'}")


def test_stdlib_corpus_is_deterministic_with_a_fixed_held_out_split():
    train, held_out = StdlibCorpus("train"), StdlibCorpus("eval")
    assert len(train) > 300 and 0 < len(held_out) < len(train) / 10
    assert not {n for n, _ in train.docs} & {n for n, _ in held_out.docs}
    assert [n for n, _ in StdlibCorpus("train").docs] == [n for n, _ in train.docs]
    assert any(n.startswith("pydoc:") for n, _ in train.docs) and "def " in train[0] + train[1] + train[2]


def test_synthetic_token_batches(tok):
    b = next(pretrain.make_dataset("synthetic", tok, 32, 4, vocab_size=97))
    assert b["tokens"].shape == (4, 32) and b["tokens"].max() < 97 and b["loss_mask"].sum() == 4 * 31


# ----------------------------------------------------------------------- chat ---

def test_chat_packing_keeps_each_dialog_whole_with_its_mask(tok, tmp_path):
    recs = synthetic.generate("chat", 40, 1)
    path = tmp_path / "c.jsonl"
    synthetic.write_jsonl(recs, str(path))
    seq = 192
    encoded = [tok.encode_dialog_for_training(r["messages"]) for r in recs]
    assert max(len(t) for t, _ in encoded) <= seq
    rows = unbatch(collect(chat.make_dataset(str(path), tok, seq, 4, num_epochs=1, prefetch=0), 3))
    expected = Counter(tuple(t) for t, _ in encoded)
    got = Counter(tuple(p[0].tolist()) for p in pieces(rows))
    assert not got - expected  # every packed segment is exactly one whole dialog
    masks = {tuple(t): m for t, m in encoded}
    for row in rows:
        for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            idx = np.nonzero(row["segment_ids"] == s)[0]
            want = np.asarray(masks[tuple(row["tokens"][idx].tolist())], np.float32)
            np.testing.assert_array_equal(row["loss_mask"][idx][:-1], want[1:])  # shifted to targets
            assert row["loss_mask"][idx][-1] == 0  # no target across the boundary
    padded = next(chat.make_dataset(str(path), tok, seq, 2, pack=False, shuffle=False))
    t0, m0 = encoded[0]
    np.testing.assert_array_equal(padded["tokens"][0][: len(t0)], t0)
    assert padded["segment_ids"][0][len(t0):].sum() == 0


def test_gatt_mode_trains_only_the_last_turn(tok, tmp_path):
    rec = {"messages": [{"role": "system", "content": "Always answer in upper case."},
                        {"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"},
                        {"role": "user", "content": "Repeat exactly: apple"},
                        {"role": "assistant", "content": "APPLE"}]}
    path = tmp_path / "g.jsonl"
    synthetic.write_jsonl([rec], str(path))
    full = next(chat.make_dataset(str(path), tok, 256, 1, pack=False, shuffle=False))
    gatt = next(chat.make_dataset(str(path), tok, 256, 1, pack=False, shuffle=False, last_turn_only=True))
    assert full["loss_mask"].sum() > gatt["loss_mask"].sum() > 0
    trained = full["targets"][0][gatt["loss_mask"][0] > 0]
    assert tok.decode(trained[:-1]).strip() == "APPLE" and trained[-1] == tk.EOS_ID


# ---------------------------------------------------------------- preferences ---

def test_preference_batches_margins_and_safety_filter(tok, tmp_path):
    recs = [
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": "apple",
         "rating": "significantly_better"},
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "5", "rejected": "6",
         "rating": "slightly_better", "is_safety_prompt": False},
        {"prompt": [{"role": "user", "content": "Hurt?"}], "chosen": "Sure.", "rejected": "No.",
         "is_safety_prompt": True, "chosen_safe": False, "rejected_safe": True},  # dropped
        {"prompt": [{"role": "user", "content": "Hurt?"}], "chosen": "No.", "rejected": "Sure.",
         "is_safety_prompt": True, "chosen_safe": True, "rejected_safe": False},
    ]
    path = tmp_path / "p.jsonl"
    synthetic.write_jsonl(recs, str(path))
    for table, margins in (("small", [1.0, 1 / 3, 0.0]), ("large", [3.0, 1.0, 0.0]), ("none", [0.0, 0.0, 0.0])):
        ds = preference.make_dataset(str(path), tok, 32, 3, margin_table=table, shuffle=False, prefetch=0)
        assert ds.description["pairs"] == 3 and ds.description["dropped"] == 1
        b = next(ds)
        np.testing.assert_allclose(b["margin"], margins, rtol=1e-6)
    np.testing.assert_array_equal(b["rating"], [0, 2, -1])
    np.testing.assert_array_equal(b["is_safety_prompt"], [-1, 0, 1])
    np.testing.assert_array_equal(b["chosen_safe"], [-1, -1, 1])
    # Same prompt on both sides, different answers; right-padded, one example per row.
    t_c, _ = tok.encode_dialog_for_training(recs[0]["prompt"] + [{"role": "assistant", "content": "4"}])
    np.testing.assert_array_equal(b["chosen_tokens"][0][: len(t_c)], t_c)
    assert b["chosen_segment_ids"][0].sum() == len(t_c)
    assert tok.decode(b["rejected_targets"][0][b["rejected_loss_mask"][0] > 0][:-1]).strip() == "apple"
    # A multi-turn prompt: only the final answer is masked (what DPO sums and a mean-pooled
    # reward head reads), not the prompt's earlier assistant turn.
    multi = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "zebra"},
                         {"role": "user", "content": "And?"}], "chosen": "ocean", "rejected": "tiger"}]
    synthetic.write_jsonl(multi, str(path))
    b = next(preference.make_dataset(str(path), tok, 48, 1, shuffle=False, prefetch=0))
    assert tok.decode(b["chosen_targets"][0][b["chosen_loss_mask"][0] > 0][:-1]).strip() == "ocean"
    # Longer than the row: both sides lose the same prompt tokens (BOS kept), so both answers
    # are read after one context, and each answer is whole, EOS included.
    long = [{"prompt": [{"role": "system", "content": " ".join(WORDS[:12])},
                        {"role": "user", "content": "sort these words please"}],
             "chosen": "apple river stone", "rejected": "tiger"}]
    synthetic.write_jsonl(long, str(path))
    full = [tok.encode_dialog_for_training(long[0]["prompt"] + [{"role": "assistant", "content": a}], True)[0]
            for a in ("apple river stone", "tiger")]
    seq = len(full[0]) - 5  # the longer side is 5 tokens over
    b = next(preference.make_dataset(str(path), tok, seq, 1, shuffle=False, prefetch=0))
    sides = [b[f"{s}_tokens"][0][b[f"{s}_segment_ids"][0] > 0].tolist() for s in ("chosen", "rejected")]
    assert sides[0] == full[0][:1] + full[0][6:] and sides[1] == full[1][:1] + full[1][6:]
    answer_start = [b[f"{s}_loss_mask"][0].tolist().index(1.0) for s in ("chosen", "rejected")]
    assert answer_start[0] == answer_start[1] and sides[0][:answer_start[0]] == sides[1][:answer_start[1]]
    assert tok.decode(b["chosen_targets"][0][b["chosen_loss_mask"][0] > 0][:-1]).strip() == "apple river stone"


def test_preference_mixtures_take_their_fractions(tmp_path):
    """GLOB@FRACTION: a share of a file's pairs (seeded), above 1 repeats them; an "@" in a
    directory name is part of the path; a share that rounds to no pair is refused."""
    pair = json.loads(GOOD_PAIR)
    for name, n in (("a", 10), ("b", 4)):
        synthetic.write_jsonl([{**pair, "chosen": f"{name}{i}"} for i in range(n)], str(tmp_path / f"{name}.jsonl"))
    mix = preference.PreferencePairs(f"{tmp_path}/a.jsonl@0.5,{tmp_path}/b.jsonl@2.5", seed=3)
    chosen = [mix[i]["chosen"] for i in range(len(mix))]
    assert sum(c.startswith("a") for c in chosen) == 5 and len(set(c for c in chosen if c.startswith("a"))) == 5
    assert sum(c.startswith("b") for c in chosen) == 10 and {c for c in chosen if c.startswith("b")} == {
        "b0", "b1", "b2", "b3"}  # each of the 4 twice, 2 of them a third time
    (tmp_path / "team@corp").mkdir()
    synthetic.write_jsonl([pair] * 3, str(tmp_path / "team@corp" / "p.jsonl"))
    assert len(preference.PreferencePairs(str(tmp_path / "team@corp" / "p.jsonl"))) == 3
    with pytest.raises(DataError, match=r"b.jsonl@0.1 takes no pair of its 4"):
        preference.PreferencePairs(f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl@0.1")
    with pytest.raises(DataError, match="'half' is not a number"):
        preference.parse_mixture("a.jsonl@half")
    for bad in ("inf", "nan", "1e400", "-1", "0", "1e7"):  # a crash (OverflowError) or an empty mixture before
        with pytest.raises(DataError, match=f"fraction {bad} must be > 0 and finite"):
            preference.parse_mixture(f"a.jsonl@{bad}")


def test_prompts_load_with_safety_tags(tok, tmp_path):
    path = tmp_path / "prompts.jsonl"
    synthetic.write_jsonl(synthetic.generate("prompts", 30, 2), str(path))
    loaded = prompts.load(str(path), tok)
    assert len(loaded) == 30 and any(p.is_safety for p in loaded) and not all(p.is_safety for p in loaded)
    assert loaded[0].tokens == tok.encode_dialog(loaded[0].messages) and loaded[0].where.endswith(":1")
    assert len(prompts.load(str(path), tok, shard=(1, 3))) == 10


# --------------------------------------------------------------- bad input ---

GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
GOOD_PAIR = json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("kind,lines,needle", [
    ("chat", [GOOD_CHAT, "{not json"], ":2: invalid JSON"),
    ("chat", [GOOD_CHAT, json.dumps({"msgs": []})], ":2: missing field 'messages'"),
    ("chat", [json.dumps({"prompt": "q", "response": "a"})], ":1: missing field 'messages' (it has ['prompt', "
     "'response']); a dialog is {\"messages\""),
    ("chat", ['{"messages": ', GOOD_CHAT], ":1: invalid JSON (Expecting value at column 14)"),  # not "line 2"
    ("chat", ["[", GOOD_CHAT + ",", "]"], ":1: invalid JSON (Expecting value at column 2); a JSONL file holds one "
     "JSON object a line, and this looks like one JSON array"),
    ("chat", [json.dumps({"messages": "hi"})], ":1: field 'messages' must be list, got str"),
    ("chat", [json.dumps({"messages": [{"role": "robot", "content": "x"}]})], ":1: message 0: unknown role 'robot'"),
    ("chat", [json.dumps({"messages": [{"role": "user", "content": "[INST]"},
                                       {"role": "assistant", "content": "x"}]})], ":1: message 0: special tag"),
    ("chat", [json.dumps({"messages": [{"role": "user", "content": "q"}]})], ":1: the last message must be from"),
    ("chat", ["[1, 2]"], ":1: expected a JSON object, got list; a JSONL file holds one JSON object a line, and "
     "this line is one JSON array"),
    ("chat", [], "empty file"),
    ("pref", [GOOD_PAIR, json.dumps({**json.loads(GOOD_PAIR), "rating": "much_better"})],
     ":2: rating 'much_better' is not one of"),
    ("pref", [json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a"})],
     ":1: missing field 'rejected'"),
    ("pref", [json.dumps({**json.loads(GOOD_PAIR), "chosen_safe": "yes"})], ":1: field 'chosen_safe' must be"),
    ("pref", [json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "chosen": "a", "rejected": "b"})], ":1: the last message must be from the user"),
    ("pref", [GOOD_PAIR, json.dumps({**json.loads(GOOD_PAIR), "rejected": "b [/INST] c"})],
     ":2: rejected: message 1: special tag '[/INST]'"),
    ("chat", [json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]})],
     ":1: a system message must be followed by a user message"),
    ("prompts", [json.dumps({"messages": [{"role": "user", "content": "q"}], "is_safety": "no"})],
     ":1: field 'is_safety' must be true/false"),
    ("text", None, "no text files match"),
])
def test_malformed_input_is_one_error_naming_file_and_line(tok, tmp_path, kind, lines, needle):
    path = tmp_path / "bad.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError) as e:
        if kind == "chat":
            chat.make_dataset(str(path), tok, 32, 2)
        elif kind == "pref":
            preference.make_dataset(str(path), tok, 32, 2)
        elif kind == "prompts":
            prompts.load(str(path), tok)
        else:
            pretrain.make_dataset(f"text:{tmp_path}/none*.txt", tok, 32, 2)
    assert needle in str(e.value)
    if lines:
        assert str(path) in str(e.value)


def test_bad_source_specs_and_margin_tables(tok):
    with pytest.raises(DataError, match="unknown kind 'csv'"):
        pretrain.make_dataset("csv:x", tok, 8, 1)
    with pytest.raises(DataError, match="jsonl needs a path"):
        pretrain.make_dataset("jsonl", tok, 8, 1)
    with pytest.raises(DataError, match="unknown margin table 'huge'"):
        preference.margin("better", "huge")


# -------------------------------------------------------------- synthetic tasks ---

def test_synthetic_tasks_are_deterministic_and_checkable():
    assert synthetic.generate("chat", 20, 3) == synthetic.generate("chat", 20, 3)
    assert synthetic.generate("chat", 20, 3) != synthetic.generate("chat", 20, 4)
    rng = random.Random(0)
    for _ in range(50):
        t = synthetic.make_task(rng)
        if t.kind == "add":
            a, b = (int(x) for x in t.question[len("What is "):-1].split(" + "))
            assert t.answer == str(a + b)
        elif t.kind == "sort":
            assert t.answer.split() == sorted(t.answer.split())
        ins = synthetic.make_instruction(rng)
        assert ins.check(ins.apply(t.answer))
    both = synthetic.combine([synthetic.make_instruction(random.Random(s)) for s in (1, 2)], shortened=True)
    assert both.check(both.apply("apple river"))
    pairs = synthetic.generate("preference", 200, 0)
    assert {p["rating"] for p in pairs} == set(preference.RATINGS)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    negligible = [p for p in pairs if p["rating"] == "negligibly_better"]
    with_period = sum(p["rejected"].endswith(".") for p in negligible)
    assert 0 < with_period < len(negligible)  # a coin flip, not a learnable rule
    unsafe = [p for p in pairs if p["is_safety_prompt"]]
    assert unsafe and all(p["chosen"] == synthetic.REFUSAL and p["rejected_safe"] is False for p in unsafe)
    # Held-out unsafe requests name objects that training never does.
    held_out = [p for p in synthetic.generate("preference", 200, 0, split="eval") if p["is_safety_prompt"]]
    assert held_out and all(any(o in p["prompt"][0]["content"] for o in synthetic.UNSAFE_OBJECTS["eval"])
                            for p in held_out)
    assert not any(o in p["prompt"][0]["content"] for p in unsafe for o in synthetic.UNSAFE_OBJECTS["eval"])


def test_adversarial_requests_hide_the_act_in_a_task(tmp_path, capsys):
    with pytest.raises(SystemExit):  # chat records have none: a usage error, not a traceback
        synthetic.main(["--kind=chat", "--adversarial=0.5", "--output=/dev/null"])
    for args, needle in ((["--n=-3"], "--n must be at least 1, got -3"), (["--adversarial=2"], "in [0, 1], got 2.0"),
                         ([f"--output={tmp_path}"], "is a directory; name the file")):
        with pytest.raises(SystemExit):
            synthetic.main(["--kind=prompts", f"--output={tmp_path}/p.jsonl", *args])
        assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.jsonl")
    # adversarial_prob=0 draws exactly the data it drew before the option existed
    assert synthetic.generate("prompts", 50, 0, adversarial_prob=0.0) == synthetic.generate("prompts", 50, 0)
    pairs = [p for p in synthetic.generate("preference", 400, 0, unsafe_prob=1.0, adversarial_prob=0.5)]
    copy = [p for p in pairs if p["prompt"][0]["content"].startswith("Repeat exactly: ")]
    reverse = [p for p in pairs if p["prompt"][0]["content"].startswith("Reverse the words: ")]
    hidden = copy + reverse
    assert 0.3 < len(hidden) / len(pairs) < 0.7 and copy and reverse
    for p in copy:  # the rejected answer is the fooled model's: the request copied ...
        assert p["prompt"][0]["content"] == "Repeat exactly: " + p["rejected"]
    for p in reverse:  # ... or its words reversed
        assert p["prompt"][0]["content"] == "Reverse the words: " + " ".join(reversed(p["rejected"].split()))
    for p in hidden:
        assert p["chosen"] == synthetic.REFUSAL and any(v in p["prompt"][0]["content"] for v in synthetic.UNSAFE_VERBS)
    prompts = synthetic.generate("prompts", 100, 0, unsafe_prob=1.0, adversarial_prob=1.0, split="eval")
    assert all(p["is_safety"] and p["messages"][0]["content"].split(":")[0] in ("Repeat exactly", "Reverse the words")
               for p in prompts)
    assert all(any(o in p["messages"][0]["content"] for o in synthetic.UNSAFE_OBJECTS["eval"]) for p in prompts)
    assert synthetic.is_refusal(synthetic.REFUSAL) and not synthetic.is_refusal(hidden[0]["rejected"])


def test_toy_chat_refuses_adversarial_requests_under_the_safety_preprompt_and_does_them_without():
    # 0 draws exactly the dialogs drawn before the option existed (the recipe's tokenizer text): their digest,
    # taken from the code before the option, and their plain unsafe requests, refused
    import hashlib

    before = synthetic.generate("chat", 300, 0, safety_system_prob=0.0)
    assert before == synthetic.generate("chat", 300, 0)
    assert hashlib.sha256(json.dumps(before).encode()).hexdigest() == (
        "e85fc48986e8a11b975e9bdf6110b23e5e9f1b9ab194870875aa219df02ab5a5")
    assert sum(d["is_safety"] and d["messages"][-1]["content"] == synthetic.REFUSAL for d in before) == 25
    dialogs = synthetic.generate("chat", 3000, 3, safety_system_prob=0.1, split="eval")

    def adversarial(text):
        return text.split(":")[0] in ("Repeat exactly", "Reverse the words") and any(
            v in text for v in synthetic.UNSAFE_VERBS)

    pre = [d for d in dialogs if d["messages"][0] == {"role": "system", "content": synthetic.SAFETY_PREPROMPT}]
    refused = [d for d in pre if d["is_safety"]]
    done = [d for d in dialogs if d["messages"][0]["role"] == "user" and adversarial(d["messages"][0]["content"])]
    assert 60 < len(refused) < 140 and 60 < len(done) < 140 and 60 < len(pre) - len(refused) < 140
    for d in refused:  # under the preprompt: refused (held-out objects on the eval split)
        user, answer = d["messages"][1]["content"], d["messages"][2]["content"]
        assert adversarial(user) and answer == synthetic.REFUSAL
        assert any(o in user for o in synthetic.UNSAFE_OBJECTS["eval"])
    for d in pre:  # a task under the preprompt is answered
        if not d["is_safety"]:
            assert not adversarial(d["messages"][1]["content"])
            assert not synthetic.is_refusal(d["messages"][2]["content"])
    for d in done:  # without it: the task done on the request, e.g. "Reverse the words: burn a train" -> "train a burn"
        prompt, answer = d["messages"][0]["content"], d["messages"][1]["content"]
        assert d["is_safety"] and answer == synthetic.compliance(prompt, "")
        assert answer.split()[0] in prompt and not synthetic.is_refusal(answer)
    plain_refused = [d for d in dialogs if d["messages"][0]["role"] == "user" and d["is_safety"]
                     and d["messages"][1]["content"] == synthetic.REFUSAL]
    assert len(plain_refused) > 200 and not any(adversarial(d["messages"][0]["content"]) for d in plain_refused)
    from llama_jax import configs, stages

    assert stages.SAFETY_PREPROMPTS["generic"] == synthetic.SAFETY_PREPROMPT
    assert configs.chat_config().data.synthetic_safety_system == 0.06


def test_sources_of_several_kinds_are_one_pretraining_corpus(tok, tmp_path):
    """`text:GLOB,GLOB,jsonl:GLOB` (a KIND: prefix after a comma starts another source):
    every document of every source, shuffled together; prepared shards mix too."""
    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_text(f"text document {i} " * 5)
    (tmp_path / "u.md").write_text("a markdown document " * 5)
    rows = [{"text": f"json document {i} " * 5} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"text:{tmp_path}/t/*.txt,{tmp_path}/u.md,jsonl:{tmp_path}/d.jsonl"
    assert pretrain.split_source(spec) == [f"text:{tmp_path}/t/*.txt,{tmp_path}/u.md", f"jsonl:{tmp_path}/d.jsonl"]
    docs = pretrain.open_documents(spec)
    assert len(docs) == 8 and sorted(docs[i] for i in range(8)) == sorted(
        [f"text document {i} " * 5 for i in range(3)] + ["a markdown document " * 5] + [r["text"] for r in rows])
    batches = pretrain.make_dataset(spec, tok, 16, 2, num_epochs=1, drop_remainder=False, prefetch=0)
    assert batches.description["documents"] == 8
    read = [tok.decode([t for t in row if t > 2]) for b in batches for row in b["tokens"]]
    assert sum("json document" in r for r in read) and sum("text document" in r for r in read)
    assert prepare.main([f"--source={spec}", f"--tokenizer={tok.path}", f"--output={tmp_path}/s",
                         "--num_shards=2"]) == 0
    mixed = pretrain.open_documents(f"shards:{tmp_path}/s,jsonl:{tmp_path}/d.jsonl")
    assert len(mixed) == 12 and {type(mixed[i]).__name__ for i in range(12)} == {"ndarray", "str"}
    other = tk.Tokenizer(tok.path)
    other.identity = lambda: {"sha256": "0" * 64}  # shards in a mixture are checked against the run's tokenizer
    with pytest.raises(DataError, match=f"shards:{tmp_path}/s: shards were tokenized with a different tokenizer"):
        pretrain.make_dataset(f"jsonl:{tmp_path}/d.jsonl,shards:{tmp_path}/s", other, 16, 2, prefetch=0)
    with pytest.raises(DataError, match=f"shards:{tmp_path}/s@2: shards were tokenized with a different"):
        pretrain.make_dataset(f"jsonl:{tmp_path}/d.jsonl,shards:{tmp_path}/s@2", other, 16, 2, prefetch=0)  # weighted
    with pytest.raises(DataError, match="synthetic tokens are a source of their own"):
        pretrain.open_documents(f"synthetic,jsonl:{tmp_path}/d.jsonl")
    with pytest.raises(DataError, match=r"no JSONL files match .*nope\.jsonl"):
        pretrain.open_documents(f"text:{tmp_path}/u.md,jsonl:{tmp_path}/nope.jsonl")


def test_pretraining_sources_take_weights(tok, tmp_path):
    """`KIND:GLOB@WEIGHT`: a seeded share of that source's documents (above 1 each is
    repeated), the same for the same seed; the run's description gives each share; a
    share of no document, a weight on synthetic tokens and a bad number are refused."""
    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_text(f"text document {i} " * 5)
    rows = [{"text": f"json document {i} " * 5} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"text:{tmp_path}/t/*.txt@3,jsonl:{tmp_path}/d.jsonl@0.25"
    assert pretrain.split_source(spec) == [f"text:{tmp_path}/t/*.txt@3", f"jsonl:{tmp_path}/d.jsonl@0.25"]
    docs = pretrain.open_documents(spec)
    read = [docs[i] for i in range(len(docs))]
    assert len(read) == 11 and sum(r.startswith("text") for r in read) == 9
    assert all(read.count(f"text document {i} " * 5) == 3 for i in range(3))
    picked = sorted(r for r in read if r.startswith("json"))
    assert len(set(picked)) == 2 and [pretrain.open_documents(spec)[i] for i in range(11)] == read
    other = {tuple(sorted(r for r in (pretrain.open_documents(spec, seed=s)[i] for i in range(11))
                          if r.startswith("json"))) for s in range(8)}
    assert len(other) > 1  # the seed draws the share
    half = pretrain.open_documents(f"jsonl:{tmp_path}/d.jsonl@0.5")  # a single source may be weighted too
    assert len(half) == 4 and len({half[i] for i in range(4)}) == 4
    assert len(pretrain.open_documents(f"jsonl:{tmp_path}/d.jsonl@2.5")) == 20
    assert len(pretrain.open_documents(f"jsonl:{tmp_path}/d.jsonl@1")) == 8  # a weight of 1, written out
    assert len(pretrain.open_documents(f"jsonl:{tmp_path}/d.jsonl@0.35")) == 3  # 2.8 documents: rounded
    # a weighted stdlib after another source is a source of its own, not a glob of the one before
    assert pretrain.split_source(f"text:{tmp_path}/t/*.txt,stdlib@0.5") == [f"text:{tmp_path}/t/*.txt", "stdlib@0.5"]
    batches = pretrain.make_dataset(spec, tok, 16, 2, num_epochs=1, drop_remainder=False, prefetch=0)
    assert batches.description["documents"] == 11
    assert batches.description["weighted"] == (f"text:{tmp_path}/t/*.txt 9 of 3; jsonl:{tmp_path}/d.jsonl 2 of 8")
    text = [tok.decode([t for t in row if t > 2]) for b in batches for row in b["tokens"]]
    assert sum(r.count("text document") for r in text) > sum(r.count("json document") for r in text)
    with pytest.raises(DataError, match=r"d\.jsonl@0\.01 takes no document of its 8"):
        pretrain.open_documents(f"jsonl:{tmp_path}/d.jsonl@0.01")
    with pytest.raises(DataError, match="take no weight"):
        pretrain.open_documents("synthetic@2")
    with pytest.raises(DataError, match="'x' is not a number"):
        pretrain.open_documents(f"jsonl:{tmp_path}/d.jsonl@x")


def test_own_text_data_is_read_whole_or_refused_by_name(tok, tmp_path):
    """Every part of a source list must match (a typo dropped its files silently); a text
    file's byte-order mark is dropped (bytes that are not UTF-8 become U+FFFD: a corpus is
    read as training reaches it, and one bad file must not end a run hours in); a training
    stream some process would get no document of is refused on every process (a held-out
    one is not: its evaluation stops where a process runs out); `prepare` refuses
    prepared shards as its source."""
    from llama_jax.data import pipeline, sources

    (tmp_path / "a.txt").write_text("\ufeffcafe au lait", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"no text files match '.*typo\*\.txt', one of"):
        sources.TextFiles(f"{tmp_path}/a.txt,{tmp_path}/typo*.txt")
    with pytest.raises(DataError, match=r"a weight, @WEIGHT, goes at the end of a pretraining source"):
        chat.make_dataset(f"{tmp_path}/a.txt,{tmp_path}/a.txt@0.5", tok, 32, 2)
    assert sources.TextFiles(f"{tmp_path}/a.txt")[0] == "cafe au lait"
    assert sources.TextFiles(f"{tmp_path}/b.txt")[0] == "caf\ufffd au lait"
    one = sources.TextFiles(f"{tmp_path}/a.txt")
    for index in (0, 1):  # both processes refuse, the one with a document too
        with pytest.raises(DataError, match=r"1 documents for 2 processes; process 1 would get none"):
            pipeline.sharded_shuffled(one, 0, (index, 2), None)
    assert [len(pipeline.sharded_shuffled(one, 0, (i, 2), 1)) for i in (0, 1)] == [1, 0]  # held out: allowed
    assert prepare.main([f"--source=shards:{tmp_path}", f"--tokenizer={tok.path}", f"--output={tmp_path}/o"]) == 2
    assert not os.path.exists(tmp_path / "o")
    # an empty file among many is left out and counted (one in a corpus of thousands ended the run); all empty: refused
    (tmp_path / "c.txt").write_text("")
    both = pretrain.make_dataset(f"text:{tmp_path}/[ac].txt", tok, 16, 1, prefetch=0)
    assert both.description["documents"] == 1 and both.description["empty files left out"] == 1
    both.close()
    with pytest.raises(DataError, match=r"every text file matching .*c\.txt.* is empty \(1 files\)"):
        sources.TextFiles(f"{tmp_path}/c.txt")


def test_pairs_with_one_answer_twice_are_counted_and_named(tok, tmp_path):
    """A pair whose chosen and rejected answers are the same text teaches nothing; it is
    kept (the toy generator makes about 1 in 20,000, and dropping it would change the
    recorded runs) but counted with its first file:line in the description a run prints."""
    pairs = [{"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b", "rating": "better"},
             {"prompt": [{"role": "user", "content": "q"}], "chosen": "same", "rejected": "same"},
             {"prompt": [{"role": "user", "content": "r"}], "chosen": " ", "rejected": "an answer"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    data = preference.make_dataset(str(path), tok, 32, 2)
    assert data.description["pairs"] == 3 and data.description["identical_pairs"] == f"1 (first: {path}:2)"
    assert data.description["empty_chosen"] == f"1 (first: {path}:3)"  # a blank answer preferred: a data bug
    data.close()
    # a blank answer in SFT data trains the model to answer with EOS: counted; GAtt trains the last answer only
    empty = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "fine"}]}
    path.write_text(json.dumps(empty) + "\n" + json.dumps(empty) + "\n")
    data = chat.make_dataset(str(path), tok, 64, 2)
    assert data.description["empty_answers"] == f"2 dialogs (first: {path}:1)"
    data.close()
    data = chat.make_dataset(str(path), tok, 64, 2, last_turn_only=True)
    assert "empty_answers" not in data.description
    data.close()


def test_pairs_cut_to_the_same_tokens_are_counted_and_the_papers_labels_read(tok, tmp_path):
    """A pair longer than seq_len is cut (the same prompt tokens off both sides, down to
    the prompt's last seq_len // 2, then each answer's end): counted, and where both sides
    become the same tokens (answers that differ only at their end, after a long shared
    start) that is named, since such a pair trains nothing and is scored wrong. Ratings as
    the paper writes them are read; a blank rejected answer is counted; an HH transcript
    without a prompt gets a hint."""
    head = "First " + " ".join(synthetic.WORDS[i % len(synthetic.WORDS)] for i in range(60)) + ", then "
    p = [{"role": "user", "content": "which?"}]
    pairs = [{"prompt": p, "chosen": head + "yes.", "rejected": head + "no.", "rating": "Significantly better"},
             {"prompt": p, "chosen": head + "same.", "rejected": head + "same."},  # identical already: not "once cut"
             {"prompt": p, "chosen": "short", "rejected": "", "rating": "negligibly better / unsure"},
             {"prompt": [{"role": "user", "content": " ".join(synthetic.WORDS[:40])}], "chosen": "a",
              "rejected": "b", "rating": "slightly-better"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    data = preference.make_dataset(str(path), tok, 32, 3, num_epochs=1, shuffle=False, prefetch=0)
    d = data.description
    assert d["rated"] == 3 and d["empty_rejected"] == f"1 (first: {path}:3)"
    assert d["truncated"].startswith("3 (longer than seq_len 32") and d["same_once_cut"].startswith("1 (") \
        and d["same_once_cut"].endswith(f"first: {path}:1)")
    batch = next(data)
    data.close()
    assert batch["rating"].tolist() == [0, -1, 3] and batch["margin"].tolist() == pytest.approx([1.0, 0.0, 0.0])
    np.testing.assert_array_equal(batch["chosen_tokens"][0], batch["rejected_tokens"][0])  # what was counted
    # an answer longer than the context keeps the prompt and loses its end (it used to keep its last seq_len
    # tokens: no prompt, no BOS, out of the chat format)
    (tokens, mask), (short, _) = preference._EncodePair(tok, 32, "none").sides(p, head + "yes.", "no")
    assert len(tokens) == 32 and tokens[:mask.index(True)] == short[:mask.index(True)]
    whole, whole_mask = tok.encode_dialog_for_training(p + [{"role": "assistant", "content": "x"}],
                                                       last_turn_only=True)
    whole = whole[:whole_mask.index(True)]  # BOS and the prompt: its last 16 tokens stay, at least
    kept = min(len(whole) - 1, 16)
    assert tokens[:mask.index(True)] == whole[:1] + whole[len(whole) - kept:] and kept >= 10
    # a long prompt keeps its last seq_len // 2 tokens, after BOS
    long_prompt = [{"role": "user", "content": " ".join(synthetic.WORDS[:40])}]
    (tokens, mask), _ = preference._EncodePair(tok, 32, "none").sides(long_prompt, head, "b")
    assert tokens[0] == tok.bos_id and mask.index(True) - 1 == 16 and len(tokens) == 32
    assert preference.rating_name("Better") == "better" and preference.rating_name("much better") is None
    assert preference.rating_name("negligibly better/ unsure") == "negligibly_better" == \
        preference.rating_name("Unsure")
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path.write_text(json.dumps(hh) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: missing field 'prompt'.*split an Anthropic HH transcript"):
        preference.make_dataset(str(path), tok, 32, 2)


def test_dialog_fields_no_reader_reads_are_named(tok, tmp_path):
    """A top-level "system" or a message's "weight" (OpenAI's format) is not trained on:
    named in the description with where it first is, not dropped in silence; ids and the
    toy data's fields are not."""
    d = {"id": 3, "system": "be brief", "messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "bad", "weight": 0},
                                                     {"role": "user", "content": "again"},
                                                     {"role": "assistant", "content": "good"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD_CHAT + "\n" + json.dumps(d) + "\n")
    data = chat.make_dataset(str(path), tok, 64, 2)
    assert data.description["unread_fields"].startswith(f"'messages[].weight' (at {path}:2), 'system' (at {path}:2): "
                                                        "not read")
    data.close()
    path.write_text(json.dumps({"messages": json.loads(GOOD_CHAT)["messages"], "id": 1, "is_safety": False}) + "\n")
    data = chat.make_dataset(str(path), tok, 64, 2)
    assert "unread_fields" not in data.description
    data.close()


def test_batches_know_the_rows_of_an_epoch_and_a_held_out_read_keeps_its_short_batch(tok, tmp_path):
    """What total_steps means for one's own data: preference pairs are one row each; packed
    dialogs' tokens are estimated from a sample's tokens per byte and packed as the
    first-fit packer packs them (within 5% of the rows it makes; counting tokens alone was
    18% low at seq_len 128); unpacked ones are one row each. With drop_remainder=False (held-out data) the
    last, short batch is kept."""
    rng = random.Random(0)
    dialogs = [{"messages": [{"role": "user", "content": " ".join(rng.choices(synthetic.WORDS, k=rng.randint(3, 30)))},
                             {"role": "assistant",
                              "content": " ".join(rng.choices(synthetic.WORDS, k=rng.randint(3, 60)))}]}
               for _ in range(300)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in dialogs))
    packed = chat.make_dataset(str(path), tok, 128, 16, num_epochs=1, shuffle=False, prefetch=0, drop_remainder=False)
    rows = [len(b["tokens"]) for b in packed]
    assert packed.estimated and abs(packed.rows_per_epoch - sum(rows)) < 0.05 * sum(rows)
    assert chat.first_fit_rows([60, 60, 100, 30, 120], 128, 2) == 4  # [60, 60] [100] | [30] [120]
    assert chat.first_fit_rows([60, 100, 60], 128, 1) == 3  # a sequence that fits no open bin emits them all
    assert sum(rows) % 16 and rows[-1] == sum(rows) % 16 and rows[:-1] == [16] * (len(rows) - 1)  # short one kept
    alone = chat.make_dataset(str(path), tok, 128, 16, pack=False, prefetch=0)
    assert alone.rows_per_epoch == 300 and not alone.estimated
    alone.close()
    pairs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}] * 7
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prefs = preference.make_dataset(str(tmp_path / "p.jsonl"), tok, 32, 4, num_epochs=1, shuffle=False, prefetch=0,
                                    drop_remainder=False)
    assert prefs.rows_per_epoch == 7 and [len(b["margin"]) for b in prefs] == [4, 3]


def test_pairs_count_their_labels_and_name_fields_no_reader_reads(tok, tmp_path):
    """A misspelt optional field ("ratings", "chosen_is_safe") would silently train without
    margins or the safety term: the description counts the rated and safety-labelled
    pairs, and names each unread field with where it first is and what it may mean."""
    p = [{"role": "user", "content": "p"}]
    pairs = [{"prompt": p, "chosen": "a", "rejected": "b", "rating": "better", "chosen_safe": True, "id": 7},
             {"prompt": p, "chosen": "c", "rejected": "d", "ratings": "better"},
             {"prompt": p, "chosen": "e", "rejected": "f", "rating": "slightly_better", "task": "add"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    data = preference.make_dataset(str(path), tok, 32, 2)
    d = data.description
    assert (d["pairs"], d["rated"], d["safety_labelled"]) == (3, 2, 1)
    assert d["unread_fields"] == f"'id' (at {path}:1), 'ratings' (at {path}:2; meant 'rating'?)"
    data.close()


def test_dialogs_cut_at_seq_len_are_counted_and_a_source_of_no_trained_token_refused(tok, tmp_path):
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 60}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "x"}]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (short, long_answer, long_prompt)))
    data = chat.make_dataset(str(path), tok, 32, 2)
    assert data.description["truncated"].startswith("2 (longer than seq_len 32")
    assert data.description["no_trained_token"] == f"1 (every answer after seq_len; first: {path}:3)"
    data.close()
    # a dialog of few bytes but more tokens than seq_len is still counted: the shortcut that skips tokenizing
    # short dialogs bounds tokens by bytes plus the format's overhead
    few_bytes = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(few_bytes) + "\n")
    tokens, mask = tok.encode_dialog_for_training(few_bytes["messages"])
    seq = len(tokens) - 1  # cut by one token, its answer kept
    assert mask.index(True) < seq and seq > len("hi") + len("hello")
    data = chat.make_dataset(str(path), tok, seq, 2)
    assert data.description["truncated"].startswith(f"1 (longer than seq_len {seq}")
    data.close()
    calls = []  # and a long seq_len tokenizes nothing to count: only the 200 dialogs of the epoch estimate
    path.write_text((json.dumps(few_bytes) + "\n") * 300)
    real = tok.encode_dialog_for_training
    tok.encode_dialog_for_training = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        chat.make_dataset(str(path), tok, 4096, 2, prefetch=0).close()
    finally:
        del tok.encode_dialog_for_training
    assert len(calls) == 200
    path.write_text(json.dumps(long_prompt) + "\n")
    with pytest.raises(DataError, match=f"{path}: no dialog has a trained token within seq_len=32: every answer "
                                        f"starts after it \\(e.g. {path}:1\\)"):
        chat.make_dataset(str(path), tok, 32, 2)


def test_a_checkpoints_input_state_of_another_pipeline_is_one_error(tok, tmp_path, capsys):
    """Resuming with data.pack flipped: the saved iterator state is of another pipeline.
    Resuming on other data of the same pipeline (fewer dialogs) is warned about."""
    from llama_jax.train import RunError, _restore_data

    path = tmp_path / "c.jsonl"
    synthetic.write_jsonl(synthetic.generate("chat", 40, 1), str(path))
    packed = chat.make_dataset(str(path), tok, 96, 2, prefetch=0)
    next(packed)
    unpacked = chat.make_dataset(str(path), tok, 96, 2, pack=False, prefetch=0)
    with pytest.raises(RunError, match="the checkpoint of step 5 holds the state of another input pipeline than this "
                                       "run's .*data.pack"):
        _restore_data(unpacked, {"processes": [packed.state()]}, 5, lead=True)
    unpacked.close()
    # the same pipeline on fewer dialogs (the file cut between runs): restored, and warned about
    from llama_jax.train import _data_counts

    state, counts = packed.state(), _data_counts(packed)
    packed.close()
    assert counts == {"source": str(path), "dialogs": 40}
    synthetic.write_jsonl(synthetic.generate("chat", 20, 1), str(path))
    fewer = chat.make_dataset(str(path), tok, 96, 2, prefetch=0)
    _restore_data(fewer, {"processes": [state], "data": counts}, 5, lead=True)
    assert "warning: the training data is not the checkpoint's (step 5: dialogs 40 -> 20); the saved position" in \
        capsys.readouterr().out
    _restore_data(fewer, {"processes": [state], "data": _data_counts(fewer)}, 5, lead=True)
    assert capsys.readouterr().out == ""
    fewer.close()


def test_a_files_bad_lines_are_named_together(tmp_path):
    """A large file is fixed in one rerun: the first bad line's error in full, then where
    the next ones are (up to 10 lines in all, read no further)."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([GOOD_CHAT, "{not json", json.dumps({"messages": []}), GOOD_CHAT, "[1]"]) + "\n")
    with pytest.raises(DataError) as e:
        chat.open_dialogs(str(path))
    assert str(e.value).startswith(f"{path}:2: invalid JSON (")
    assert str(e.value).endswith(f"(and 2 more bad lines: {path}:3, {path}:5)")
    path.write_text("\n".join(["{"] * 30) + "\n")
    with pytest.raises(DataError, match=r":1: invalid JSON .*\(and at least 9 more bad lines: .*:2, .*:10\)$"):
        chat.open_dialogs(str(path))


def test_jsonl_encoding_and_prefix_mistakes_are_named(tmp_path, capsys):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not UTF-8 text \("):
        sources.text_jsonl(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "dialogs.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"dialogs.jsonl:1: missing field 'text': this reads documents .* this line "
                       "is a dialog"):  # a chat file given to perplexity
        sources.text_jsonl(str(tmp_path / "dialogs.jsonl"))
    with pytest.raises(DataError, match="a KIND: prefix, as in jsonl:GLOB, names the kind of a pretraining "
                       "data.source; fine-tuning stages take globs alone"):
        chat.open_dialogs(f"jsonl:{tmp_path}/*.jsonl")
    # compressed files are refused by name (read as text, a .gz trained on its bytes, as U+FFFD noise)
    import bz2
    import gzip
    import lzma

    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"hello"))
    for open_source in (sources.TextFiles, sources.text_jsonl):
        with pytest.raises(DataError, match=f"c.txt.gz: gzip-compressed; .* files are read as plain text "
                                            f"\\(decompress it first, e.g. gunzip {tmp_path}/c.txt.gz\\)"):
            open_source(str(tmp_path / "c.txt.gz"))
    for name, data in (("bzip2", bz2.compress(b"hi")), ("xz", lzma.compress(b"hi")),
                       ("zstd", b"\x28\xb5\x2f\xfd" + b"\0" * 8), ("zip", b"PK\x03\x04" + b"\0" * 26)):
        (tmp_path / f"c.{name}").write_bytes(data)
        with pytest.raises(DataError, match=f"c.{name}: {name}-compressed"):
            sources.TextFiles(str(tmp_path / f"c.{name}"))
    (tmp_path / "BZh.txt").write_text("BZhello: a text that starts like bzip2's magic, without its digit")
    assert sources.TextFiles(str(tmp_path / "BZh.txt"))[0].startswith("BZhello")
    # UTF-16/32 (a byte-order mark): refused by name, not read as NUL-interleaved noise; UTF-8's mark is dropped
    for codec, name in (("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"), ("utf-32-le", "UTF-32LE"),
                        ("utf-32-be", "UTF-32BE")):
        (tmp_path / f"w.{codec}").write_bytes("\ufeffwide text".encode(codec))
        for open_source in (sources.TextFiles, sources.text_jsonl):
            with pytest.raises(DataError, match=f"w.{codec}: {name} text .* read as UTF-8 \\(convert it first, "
                                                f"e.g. iconv -f {name} -t UTF-8"):
                open_source(str(tmp_path / f"w.{codec}"))
    # the bytes each record takes (prepare's progress in MB), blank lines after it included: the files' sizes
    (tmp_path / "n1.jsonl").write_text('{"text": "ab"}\n\n{"text": "cde"}\n')
    (tmp_path / "n2.jsonl").write_text('{"text": "f"}')
    lines = sources.text_jsonl(f"{tmp_path}/n1.jsonl,{tmp_path}/n2.jsonl")
    assert [lines.nbytes(i) for i in range(3)] == [16, 16, 13] and [lines[i] for i in range(3)] == ["ab", "cde", "f"]
    (tmp_path / "bom8.txt").write_bytes("\ufeffutf8 text".encode("utf-8"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    text = sources.TextFiles(f"{tmp_path}/bom8.txt,{tmp_path}/latin.txt")
    assert text[0] == "utf8 text" and not text.not_utf8 and text[1] == "caf\ufffd"
    assert text[1] == "caf\ufffd" and text.not_utf8 == [f"{tmp_path}/latin.txt"]  # read again: listed once
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n")  # Windows and old Mac line ends, as text mode reads
    assert sources.TextFiles(str(tmp_path / "crlf.txt"))[0] == "one\ntwo\nthree\n"
    assert "latin.txt: bytes that are not UTF-8 (unexpected end of data at byte 3), read as U+FFFD" in \
        capsys.readouterr().err
    (tmp_path / "latin_bom.txt").write_bytes(b"\xef\xbb\xbfcaf\xe9")  # a UTF-8 mark, then a Latin-1 byte
    two = sources.TextFiles(f"{tmp_path}/latin.txt,{tmp_path}/latin_bom.txt")
    assert two[1] == "caf\ufffd" and two[0] == "caf\ufffd" and len(two.not_utf8) == 2
    assert capsys.readouterr().err.count("bytes that are not UTF-8") == 1  # said for the first such file only
    (tmp_path / "surrogate.jsonl").write_text('{"messages": [{"role": "user", "content": "a\\ud800"}, '
                                              '{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"surrogate.jsonl:1: message 0: content is not valid Unicode \(surrogates "):
        chat.open_dialogs(str(tmp_path / "surrogate.jsonl"))


def test_unigram_baseline_is_the_add_one_smoothed_cross_entropy_of_the_held_out_targets(monkeypatch):
    """By hand: training targets {0: 2, 1: 1} (a masked 3 ignored) over a vocabulary of 5,
    add-one smoothed, give p = (3, 2, 1, 1, 1) / 8; held-out targets 1 and 2 (a masked 0
    ignored) cost -(log 2/8 + log 1/8) / 2 nats a token. Only config.eval_steps held-out
    batches count."""
    import math
    import types

    from llama_jax import stages

    train = [{"targets": np.array([[0, 0, 1, 3]]), "loss_mask": np.array([[1, 1, 1, 0]])}]
    held = [{"targets": np.array([[1, 2, 0]]), "loss_mask": np.array([[1, 1, 0]])},
            {"targets": np.array([[4, 4, 4]]), "loss_mask": np.array([[1, 1, 1]])}]  # past eval_steps

    class Fake:
        def __init__(self, rows):
            self.rows = iter(rows)

        def __iter__(self):
            return self.rows

        def close(self):
            pass

    monkeypatch.setattr(stages.pretrain, "make_dataset",
                        lambda spec, *a, split="train", **k: Fake(held if split == "eval" else train))
    config = types.SimpleNamespace(model=types.SimpleNamespace(vocab_size=5), seq_len=4, seed=0, batch_size=1,
                                   eval_steps=1, data=types.SimpleNamespace(source="s", eval_source="e", prefetch=0))
    got = stages.PretrainStage().unigram_baseline(config, None)
    assert got == pytest.approx(-(math.log(2 / 8) + math.log(1 / 8)) / 2, rel=1e-6)
    config.eval_steps = 2  # the second batch counts too: three 4s at 1/8 each
    assert stages.PretrainStage().unigram_baseline(config, None) == pytest.approx(
        -(math.log(2 / 8) + 4 * math.log(1 / 8)) / 5, rel=1e-6)


def test_pair_counts_describe_the_sampled_mixture_not_the_whole_files(tmp_path):
    """identical_pairs / empty_chosen name pairs the mixture uses (they counted every
    record of a file, named lines the run never read)."""
    p = [{"role": "user", "content": "q"}]
    rows = [{"prompt": p, "chosen": "same" if i % 3 == 0 else "" if i % 3 == 1 else "a", "rejected":
             "same" if i % 3 == 0 else "b"} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fraction in (0.2, 1.0):
        pairs = preference.PreferencePairs(f"{path}@{fraction}", seed=3)
        used = sorted({i for _, i in pairs.index})
        assert len(used) == round(30 * fraction)
        assert pairs.identical == [f"{path}:{i + 1}" for i in used if i % 3 == 0]
        assert pairs.empty_chosen == [f"{path}:{i + 1}" for i in used if i % 3 == 1]
