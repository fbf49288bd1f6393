import os
import random

import pytest
from reference import meta_chat_tokens
from sentencepiece import sentencepiece_model_pb2

from llama_jax import tokenizer as tk

WORDS = ["the", "cat", "sat", "on", "mat", "42", "1999", "réponse", "naïve", "日本", "code", "x=3;", "  ", "\n",
         "Hello", "WORLD", "don't", "snake_case", "ünïcödé", "(a+b)", "—", "🙂"]


def corpus_text(n_lines, seed):
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    for i in range(2):
        (d / f"part{i}.txt").write_text(corpus_text(400, i))
    assert tk.main(["train", f"--input={d}/*.txt", "--vocab_size=400", f"--output={d}/tok.model"]) == 0
    return tk.Tokenizer(str(d / "tok.model"))


def test_trained_model_has_llama2_trainer_settings(tok):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(tok.path, "rb").read())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert t.vocab_size == 400 == tok.vocab_size
    assert (t.split_digits, t.byte_fallback, t.allow_whitespace_only_pieces) == (True, True, True)
    assert t.max_sentencepiece_length == 16
    assert t.character_coverage == pytest.approx(0.99995)
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, -1)


def test_digits_split_bytes_fall_back_and_text_round_trips(tok):
    ids = tok.encode("year 1999 🙂 ☃", bos=True, eos=True)
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert ids[0] == 1 and ids[-1] == 2
    assert "1" in pieces and "9" in pieces and not any(len(p) > 1 and p.isdigit() for p in pieces)
    assert "<0xE2>" in pieces  # the snowman is not in the vocabulary: byte fallback, not <unk>
    assert 0 not in ids
    text = "  two  spaces\tand tab  "
    assert tok.decode(tok.encode(text)) == text  # identity normalisation keeps white space


def random_dialog(rng, n_turns, system, last):
    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))

    msgs = [{"role": "system", "content": text()}] if system else []
    for i in range(n_turns):
        msgs.append({"role": "user", "content": rng.choice(["", " "]) + text() + rng.choice(["", " ", "\n"])})
        if i < n_turns - 1 or last == "assistant":
            msgs.append({"role": "assistant", "content": text() + rng.choice(["", "  "])})
    return msgs


def test_encode_dialog_equals_meta_formula_on_random_dialogs(tok):
    rng = random.Random(0)
    for k in range(200):
        d = random_dialog(rng, rng.randint(1, 4), system=k % 2 == 0, last="user")
        assert tok.encode_dialog(d) == meta_chat_tokens(tok.encode, d)


def test_training_form_tokens_and_loss_mask(tok):
    rng = random.Random(1)
    for k in range(100):
        d = random_dialog(rng, rng.randint(1, 4), system=k % 3 == 0, last="assistant")
        tokens, mask = tok.encode_dialog_for_training(d)
        assert tokens == meta_chat_tokens(tok.encode, d)  # the completed turns, Meta's way
        answers = [m["content"] for m in d if m["role"] == "assistant"]
        # Split at BOS: one turn each; the masked tokens are the answer, then its EOS.
        starts = [i for i, t in enumerate(tokens) if t == tok.bos_id] + [len(tokens)]
        assert len(starts) - 1 == len(answers)
        for (a, b), answer in zip(zip(starts, starts[1:]), answers):
            turn_mask = mask[a:b]
            assert tokens[b - 1] == tok.eos_id and turn_mask[-1] and not turn_mask[0]
            first = turn_mask.index(True)
            assert all(turn_mask[first:])  # one contiguous run to the end of the turn
            assert tok.decode(tokens[a + first:b - 1]) == answer.strip() + " "
            assert tok.decode(tokens[a + 1:a + first]).endswith("[/INST]")


def test_gatt_trains_only_the_last_turn(tok):
    d = random_dialog(random.Random(2), 3, system=True, last="assistant")
    tokens, full = tok.encode_dialog_for_training(d)
    _, last = tok.encode_dialog_for_training(d, last_turn_only=True)
    last_bos = max(i for i, t in enumerate(tokens) if t == tok.bos_id)
    assert not any(last[:last_bos]) and last[last_bos:] == full[last_bos:]
    assert sum(full) > sum(last) > 0


@pytest.mark.parametrize("dialog,needle", [
    ([], "empty dialog"),
    ([{"role": "user", "content": "hi [INST] there"}], "message 0: special tag '[INST]' is not allowed"),
    ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}], "special tag '<<SYS>>'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b [/INST]"}], "message 1: special tag"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1: expected role 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     "message 2: expected role 'assistant'"),
    ([{"role": "bot", "content": "a"}], "message 0: unknown role 'bot'"),
    ([{"role": "user"}], "message 0: must be an object with 'role' and 'content'"),
    ([{"role": "system", "content": "s"}], "must be followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from the user"),
])
def test_bad_dialogs_are_clear_errors(tok, dialog, needle):
    with pytest.raises(tk.DialogError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        tok.encode_dialog(dialog)


def test_training_form_needs_a_final_answer(tok):
    with pytest.raises(tk.DialogError, match="last message must be from the assistant"):
        tok.encode_dialog_for_training([{"role": "user", "content": "a"}])


def test_bad_tokenizer_files_and_sizes(tok, tmp_path, capsys):
    with pytest.raises(tk.TokenizerError, match="tokenizer model not found"):
        tk.Tokenizer(str(tmp_path / "none.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(tk.TokenizerError, match="junk.model: not a SentencePiece model"):
        tk.Tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(tk.TokenizerError, match="tokenizer vocabulary 400 is larger than the model vocab_size 300"):
        tok.check_fits(300)
    tok.check_fits(400)
    assert tk.main(["train", f"--input={tmp_path}/*.txt", "--vocab_size=400", f"--output={tmp_path}/t.model"]) == 2
    assert "no text files match" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("abc")
    assert tk.main(["train", f"--input={tmp_path}/a.txt", "--vocab_size=100", f"--output={tmp_path}/t.model"]) == 2
    assert "vocab_size 100 is too small" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "t.model")


def test_identity_names_the_exact_model(tok):
    ident = tok.identity()
    assert ident["vocab_size"] == 400 and len(ident["sha256"]) == 64
    assert tk.Tokenizer(tok.path).identity() == ident


def test_a_trained_tokenizer_also_learns_from_tokenizer_extra(tmp_path):
    """config.data.tokenizer_extra (the recipe's toy text): its words become single
    pieces that the training documents alone would split; a glob matching nothing names
    the field."""
    from llama_jax import configs, stages
    from llama_jax.data.sources import DataError

    (tmp_path / "docs.txt").write_text(corpus_text(400, 0))
    (tmp_path / "toy.txt").write_text("\n".join(["zebra flame sugar"] * 300))
    c = configs.base_config()
    c.data.source, c.model.vocab_size = f"text:{tmp_path}/docs.txt", 400
    plain = stages.Stage().train_tokenizer(c, str(tmp_path / "plain.model"))
    assert len(plain.sp.encode("zebra flame sugar")) > 3
    c.data.tokenizer_extra = f"{tmp_path}/toy*.txt"
    toy = stages.Stage().train_tokenizer(c, str(tmp_path / "toy.model"))
    assert toy.sp.encode("zebra flame sugar", out_type=str) == ["▁zebra", "▁flame", "▁sugar"]
    assert toy.sp.encode("the cat sat", out_type=str) == plain.sp.encode("the cat sat", out_type=str)
    c.data.tokenizer_extra = f"{tmp_path}/missing*.txt"
    with pytest.raises(DataError, match="config.data.tokenizer_extra"):
        stages.Stage().train_tokenizer(c, str(tmp_path / "missing.model"))


def test_a_tokenizer_trains_on_documents_of_one_long_line(tmp_path):
    """SentencePiece skips lines over 4,192 bytes: documents written whole as one line
    each gave it nothing to train on (an INTERNAL error) or were dropped silently from a
    mixed source. They are written in lines of at most 1,000 characters."""
    import json

    from llama_jax import configs, stages

    docs = [" ".join(corpus_text(400, i).split()) for i in range(8)]  # newlines gone: one line each
    assert min(len(d.encode()) for d in docs) > 4192
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = configs.base_config()
    c.data.source, c.model.vocab_size = f"jsonl:{tmp_path}/long.jsonl", 400
    tok = stages.Stage().train_tokenizer(c, str(tmp_path / "long.model"))
    assert tok.vocab_size == 400 and len(tok.encode(docs[0][:200])) < 100  # merges learnt from the text


def test_a_sampled_answer_ends_before_a_chat_format_tag(tok):
    """A model that writes [INST] (or another tag) has ended its turn: the text and the
    tokens kept stop before it, so the answer can join a dialog (a tag inside a message is
    refused) and PPO trains on exactly the tokens the reward model saw."""
    plain = tok.encode("the cat sat") + [tok.eos_id]
    assert tok.answer(plain) == ("the cat sat", len(plain))
    for tag in tk.SPECIAL_TAGS:
        ids = tok.encode(f"the cat sat {tag} on the mat") + [tok.eos_id]
        text, n = tok.answer(ids)
        assert text == "the cat sat", tag
        assert tok.decode(ids[:n]).strip() == text and tok.eos_id not in ids[:n]
        assert tag not in tok.decode(ids[:n + 2])  # the cut is at the tag, not tokens before it
        tok.encode_dialog([{"role": "user", "content": "q"}, {"role": "assistant", "content": text},
                           {"role": "user", "content": "next"}])
    ids = tok.encode("[INST] hi")
    text, n = tok.answer(ids)
    assert text == "" and tok.decode(ids[:n]).strip() == "" and n < 3
    for text in ("the 日本 sat", "naïve ünïcödé réponse"):  # characters of several byte pieces end whole
        ids = tok.encode(f"{text} [/INST] x")
        got, n = tok.answer(ids)
        assert got == text and tok.decode(ids[:n]).strip() == text, text
    from llama_jax.rlhf import sample_of

    eos = [tok.eos_id]
    assert sample_of(tok, tok.encode("the cat") + eos, [-1.0] * 3) == ("the cat", tok.encode("the cat") + eos,
                                                                        [-1.0] * 3, True)
    assert not sample_of(tok, tok.encode("the cat"), [-1.0] * 2).finished  # ran out of tokens
    cut = sample_of(tok, tok.encode("the cat [INST] x"), [-1.0] * 9)  # the turn ended at the tag
    assert cut.finished and cut.text == "the cat" and tok.decode(cut.tokens).strip() == "the cat"
    assert len(cut.logprobs) == len(cut.tokens) < len(tok.encode("the cat [INST] x"))
    assert not sample_of(tok, tok.encode("[INST] x") + eos).finished  # nothing before the tag: no answer


def test_a_tokenizer_of_a_large_corpus_learns_from_all_of_it(tmp_path, monkeypatch):
    """Over the character budget, the documents come from the whole source (seeded), not
    its first files in name order; under it, all of them, in order. No text: one line."""
    import re

    from llama_jax import configs, stages

    for i in range(40):
        (tmp_path / f"a{i:02d}.txt").write_text(f"doc{i} " * 500)
    seen = []
    monkeypatch.setattr(tk, "train", lambda inputs, *a: seen.append(open(inputs[0]).read()) or 1 / 0)
    c = configs.base_config()
    c.data.source = f"text:{tmp_path}/a*.txt"
    for budget in (10**9, 40_000):
        monkeypatch.setattr(stages, "TOKENIZER_TEXT_BUDGET", budget)
        with pytest.raises(ZeroDivisionError):  # stops at training: the sample is what is checked
            stages.Stage().train_tokenizer(c, str(tmp_path / "t.model"))
    every, drawn = ({int(n) for n in re.findall(r"doc(\d+)", text)} for text in seen)
    assert every == set(range(40))
    assert 12 <= len(drawn) <= 15 and max(drawn) >= 20 and drawn != set(range(len(drawn)))
    assert len(seen[1]) - seen[1].count("\n") == 40_000  # the budget is a bound: the last document is cut
    c.data.source = "synthetic"
    with pytest.raises(tk.TokenizerError, match="no text to train a tokenizer on; set --config.data.tokenizer"):
        stages.Stage().train_tokenizer(c, str(tmp_path / "t.model"))


def test_the_tokenizer_cli_trains_on_the_text_field_of_jsonl(tmp_path, capsys):
    """`--input=jsonl:GLOB` learns the records' text, not JSON syntax; a plain glob that
    matches .jsonl files (read as text) gets a note saying how to read them."""
    import json

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": corpus_text(5, i)}) + "\n" for i in range(200)))
    assert tk.main(["train", f"--input=jsonl:{tmp_path}/c.jsonl", "--vocab_size=400",
                    f"--output={tmp_path}/j.model"]) == 0
    pieces = {tk.Tokenizer(str(tmp_path / "j.model")).sp.id_to_piece(i) for i in range(400)}
    assert not any('"' in p or "{" in p for p in pieces), sorted(p for p in pieces if '"' in p or "{" in p)
    assert "▁the" in pieces
    assert tk.main(["train", f"--input={tmp_path}/c.jsonl", "--vocab_size=400", f"--output={tmp_path}/p.model"]) == 0
    assert f"jsonl:{tmp_path}/c.jsonl reads their text field" in capsys.readouterr().err
    assert any('"' in tk.Tokenizer(str(tmp_path / "p.model")).sp.id_to_piece(i) for i in range(400))
    assert tk.main(["train", f"--input=jsonl:{tmp_path}/none*.jsonl", "--vocab_size=400",
                    f"--output={tmp_path}/n.model"]) == 2
    assert "none*.jsonl" in capsys.readouterr().err


def test_the_tokenizer_cli_reads_files_as_a_run_reads_them(tmp_path, capsys):
    """Plain text files go to SentencePiece whole, streamed (a corpus file is never read
    into memory): lines over 4,192 bytes (which SentencePiece skips) are learnt, Windows
    line ends teach no `\\r` pieces, every glob must match, and its size errors name its
    own flags. JSONL documents are budgeted by --max_characters."""
    rng = random.Random(0)
    words = ["xylophone", "marmalade", "zebra", "flame", "sugar", "river", "lemon", "cloud"]
    (tmp_path / "long.txt").write_text("".join(" ".join(rng.choice(words) for _ in range(1000)) + "\n"
                                               for _ in range(60)))
    (tmp_path / "win[1].txt").write_bytes(corpus_text(600, 1).replace("\n", ":\r\n").encode())
    assert tk.main(["train", f"--input={tmp_path}/long.txt", f"--input=text:{tmp_path}/win[1].txt",
                    "--vocab_size=400", f"--output={tmp_path}/t.model"]) == 0  # a file's own name, brackets and all
    assert "training a 400-piece tokenizer on 2 text files (SentencePiece samples 2,000,000 lines of them)" in \
        capsys.readouterr().err
    t = tk.Tokenizer(str(tmp_path / "t.model"))
    assert t.sp.encode("xylophone marmalade", out_type=str) == ["▁xylophone", "▁marmalade"]
    assert not [t.sp.id_to_piece(i) for i in range(t.vocab_size) if "\r" in t.sp.id_to_piece(i)]
    (tmp_path / "win.txt").write_bytes((tmp_path / "win[1].txt").read_bytes())  # train() on files, as a run's
    direct = tk.train([str(tmp_path / "long.txt"), str(tmp_path / "win.txt")], 400, str(tmp_path / "d.model"))
    assert direct.sp.encode("xylophone marmalade", out_type=str) == ["▁xylophone", "▁marmalade"]  # tokenizer_extra
    assert not [direct.sp.id_to_piece(i) for i in range(400) if "\r" in direct.sp.id_to_piece(i)]
    assert tk.main(["train", f"--input={tmp_path}/long.txt,{tmp_path}/typo*.txt", "--vocab_size=400",
                    f"--output={tmp_path}/x.model"]) == 2
    assert "no text files match" in capsys.readouterr().err and not os.path.exists(tmp_path / "x.model")
    assert tk.main(["train", f"--input={tmp_path}", "--vocab_size=400", f"--output={tmp_path}/x.model"]) == 2
    assert f"is a directory: name its files, e.g. {tmp_path}/*" in capsys.readouterr().err
    assert tk.main(["train", f"--input={tmp_path}/long.txt", "--vocab_size=262", f"--output={tmp_path}/x.model"]) == 2
    err = capsys.readouterr().err
    assert "vocab_size 262 is too small for this text" in err and "character_coverage" not in err.split(")")[-1]
    assert tk.main(["train", f"--input={tmp_path}/long.txt", "--vocab_size=5000", f"--output={tmp_path}/x.model"]) == 2
    assert "vocab_size 5000 is more pieces than this text yields (at most" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n\n\n")
    assert tk.main(["train", f"--input={tmp_path}/blank.txt", "--vocab_size=400", f"--output={tmp_path}/x.model"]) == 2
    assert "no text to train on" in capsys.readouterr().err
    # JSONL over --max_characters: documents drawn from all of them, said
    import json

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": corpus_text(40, i)}) + "\n" for i in range(50)))
    assert tk.main(["train", f"--input={tmp_path}/long.txt", f"--input=jsonl:{tmp_path}/d.jsonl", "--vocab_size=400",
                    "--max_characters=20000", f"--output={tmp_path}/s.model"]) == 0
    assert "on 1 text files (SentencePiece samples 2,000,000 lines of them) and 20,000 characters of JSONL " \
        "documents drawn (seed 0) from all 50" in capsys.readouterr().err
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + corpus_text(300, 2).encode())  # a byte-order mark is no text
    bom = tk.train([str(tmp_path / "bom.txt")], 400, str(tmp_path / "bom.model"))
    assert not [bom.sp.id_to_piece(i) for i in range(400) if "\ufeff" in bom.sp.id_to_piece(i)]


def test_the_tokenizer_cli_decodes_and_describes(tok, capsys):
    ids = tok.encode("the cat sat 42", bos=True)
    assert tk.main(["decode", f"--model={tok.path}", f"--ids={ids}"]) == 0
    assert capsys.readouterr().out == "the cat sat 42\n"
    assert tk.main(["decode", f"--model={tok.path}", "--ids=1 400"]) == 2
    assert "ids [400] are outside its vocabulary of 400" in capsys.readouterr().err
    assert tk.main(["info", f"--model={tok.path}", "--pieces=4"]) == 0
    out = capsys.readouterr().out
    assert f"vocab 400, sha256 {tok.identity()['sha256']}" in out and "Llama 2's trainer settings: all" in out
    assert "pieces: 0:<unk> 1:<s> 2:</s> 3:<0x00>" in out
    spm = __import__("sentencepiece")
    other = os.path.join(os.path.dirname(tok.path), "other")
    spm.SentencePieceTrainer.train(input=tok.path.replace("tok.model", "part0.txt"), model_prefix=other,
                                   vocab_size=60, model_type="unigram", minloglevel=2, pad_id=-1)
    assert tk.main(["info", f"--model={other}.model"]) == 0
    assert "Llama 2's trainer settings, except model_type, " in capsys.readouterr().out


def test_the_same_text_trains_the_same_file_wherever_it_lies(tmp_path):
    """SentencePiece records its input and output paths in the model: a run's tokenizer,
    trained from a temporary file, had another sha256 on every run (the same pieces). They
    are dropped, so the same text gives the same tokenizer.model."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / f"text_{d}.txt").write_text(corpus_text(300, 0))
    one = tk.train([str(tmp_path / "a" / "text_a.txt")], 400, str(tmp_path / "a" / "one.model"))
    two = tk.train([str(tmp_path / "b" / "text_b.txt")], 400, str(tmp_path / "b" / "two.model"))
    assert one.identity()["sha256"] == two.identity()["sha256"]
    assert str(tmp_path) not in open(one.path, "rb").read().decode("latin-1")
