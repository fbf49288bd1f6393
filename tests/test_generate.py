import io
import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, run

from llama_jax import chat
from llama_jax import checkpoint as ckpt
from llama_jax import generate as gen
from llama_jax import tokenizer as tk
from llama_jax.data import synthetic
from llama_jax.model import KVCache, Llama, LlamaConfig

CFG = LlamaConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, ffn_hidden_dim=80, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, std=0.15, seed=3)


def reference_greedy(params, prompt, n):
    """Greedy decoding by full forward passes (no cache): the ground truth."""
    seq, lps = list(prompt), []
    for _ in range(n):
        logits = np.asarray(run(Llama(CFG), params, np.array([seq])))[0, -1]
        tok = int(np.argmax(logits))
        lps.append(float(jax.nn.log_softmax(logits)[tok]))
        seq.append(tok)
    return seq[len(prompt):], lps


def test_greedy_batch_of_ragged_prompts_equals_full_forward_decoding(params):
    prompts = [[1, 5, 9], [1, 17, 3, 44, 12, 7, 90], [1, 200]]
    out = gen.generate(CFG, params, prompts, max_new_tokens=6, eos_id=-1)
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        ref_toks, ref_lps = reference_greedy(params, p, 6)
        assert toks == ref_toks
        np.testing.assert_allclose(lps, ref_lps, atol=1e-5)


def test_temperature_zero_top_p_zero_and_top_k_one_are_greedy(params):
    prompts = [[1, 5, 9, 33], [1, 8]]
    greedy = gen.generate(CFG, params, prompts, 8, temperature=0.0).tokens
    assert gen.generate(CFG, params, prompts, 8, temperature=0.9, top_p=0.0, seed=1).tokens == greedy
    assert gen.generate(CFG, params, prompts, 8, temperature=0.9, top_k=1, seed=2).tokens == greedy
    # a temperature so small that logits / temperature overflows float32 samples the greedy token (it drew
    # token 0 from a NaN softmax); values no sampler has are refused, not read as greedy or unfiltered
    assert gen.generate(CFG, params, prompts, 8, temperature=1e-38, seed=3).tokens == greedy
    assert gen.generate(CFG, params, prompts, 8, temperature=1e-30, seed=3).tokens == greedy  # sampled, shifted
    # logits / temperature past float32's range: shifted to a maximum of 0 first, the top token is drawn
    logits = jnp.array([[0.0, 50.0, 100.0], [100.0, 0.0, 99.0]])
    assert gen.sample_logits(logits, jax.random.key(0), 1e-37, 1.0, 0).tolist() == [2, 0]
    for bad in (dict(temperature=float("nan")), dict(temperature=-1.0), dict(temperature=float("inf")),
                dict(temperature=1.0, top_p=1.5), dict(temperature=1.0, top_p=float("nan")),
                dict(temperature=1.0, top_k=-3)):
        with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
            gen.generate(CFG, params, prompts, 8, **bad)


def test_sampling_is_reproducible_per_seed_and_respects_top_k(params):
    prompts = [[1, 5, 9, 33]] * 4
    a = gen.generate(CFG, params, prompts, 10, temperature=1.0, seed=7)
    b = gen.generate(CFG, params, prompts, 10, temperature=1.0, seed=7)
    c = gen.generate(CFG, params, prompts, 10, temperature=1.0, seed=8)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    assert len({tuple(t) for t in a.tokens}) > 1  # rows draw different samples
    k = gen.generate(CFG, params, [[1, 5, 9, 33]], 6, temperature=1.5, top_k=3, seed=3).tokens[0]
    seq = [1, 5, 9, 33]
    for t in k:  # each sampled token is among the 3 most likely at its step
        logits = np.asarray(run(Llama(CFG), params, np.array([seq])))[0, -1]
        assert t in np.argsort(logits)[-3:]
        seq.append(t)
    # top_k at or above the vocabulary keeps every token: the same draws as no top-k
    assert gen.generate(CFG, params, prompts, 10, temperature=1.0, top_k=CFG.vocab_size + 50, seed=7).tokens == a.tokens


def test_inverse_cdf_sampling_draws_the_softmax_distribution_and_never_a_masked_token():
    V = 200  # not a multiple of the 64-token blocks: the last block is padded
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, V).astype(np.float32)
    logits[64:128] = np.finfo(np.float32).min  # a whole block masked (top-k / top-p's value)
    logits[[3, 150, 199]] = np.finfo(np.float32).min
    n = 200_000
    draws = np.asarray(jax.jit(gen.inverse_cdf_sample)(np.tile(logits, (n, 1)), jax.random.key(5)))
    p = np.asarray(jax.nn.softmax(logits))
    counts = np.bincount(draws, minlength=V)
    assert counts[p == 0].sum() == 0 and draws.min() >= 0 and draws.max() < V
    expected = n * p[p > 0]
    chi2 = float(np.sum((counts[p > 0] - expected) ** 2 / expected))
    dof = int((p > 0).sum()) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # a wrong block or offset is far above this
    # one token carries all the mass: it is always drawn, at a block's first and last slot
    for only in (0, 127, 128, 199):
        one = np.full((64, V), np.finfo(np.float32).min, np.float32)
        one[:, only] = 0.0
        assert set(np.asarray(gen.inverse_cdf_sample(one, jax.random.key(only))).tolist()) == {only}


def test_stops_at_eos_and_streams(params):
    forced = jax.tree_util.tree_map(np.array, params)
    forced["output"][:, tk.EOS_ID] += 100.0  # EOS becomes overwhelmingly likely
    seen = []
    out = gen.generate(CFG, forced, [[1, 4, 5], [1, 6]], 20, on_token=lambda t, d: seen.append((t.tolist(),
                                                                                                  d.tolist())))
    assert out.tokens == [[tk.EOS_ID], [tk.EOS_ID]]
    assert seen == [([tk.EOS_ID, tk.EOS_ID], [False, False])]  # one step, then the loop ends on device
    # the callback's own error comes back as it is (it was XLA's INTERNAL runtime error), and a return value
    # that is not a stop flag (a per-row array, a string) is an error, not "stop" by truthiness

    def broken(tokens, done):
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        gen.generate(CFG, params, [[1, 4, 5]], 4, on_token=broken)
    with pytest.raises(TypeError, match=r"on_token must return True \(stop every row\), False or None; got 'no'"):
        gen.generate(CFG, params, [[1, 4, 5]], 4, on_token=lambda t, d: "no")
    assert len(gen.generate(CFG, params, [[1, 4, 5]], 3, on_token=lambda t, d: False, eos_id=-1).tokens[0]) == 3


def test_prompt_too_long_is_a_clear_error(params):
    with pytest.raises(ValueError, match=r"the prompt \(100 tokens\) \+ max_new_tokens 40 exceeds the model's "
                                         "max_seq_len 128"):
        gen.generate(CFG, params, [[1] * 100], 40)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate(CFG, params, [[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        gen.generate(CFG, params, [[1, 2]], 0)
    for bad in (CFG.vocab_size, -1):  # the embedding would give NaN logits, or another token, silently
        with pytest.raises(ValueError, match=f"prompt 1 has token id {bad}, outside the model's vocabulary "
                                             f"\\[0, {CFG.vocab_size}\\)"):
            gen.generate(CFG, params, [[1, 2], [3, bad, 4]], 4)
    with pytest.raises(ValueError, match="Llama: 9 tokens do not fit a KV cache of 8 slots"):
        Llama(CFG).apply({"params": params}, jnp.ones((1, 9), jnp.int32), cache=KVCache.init(CFG, 1, 8))
    # what a library caller may pass: each a one-line error (they were an ambiguous-truth-value error, int(),
    # len() of an int, max() of nothing, floats cut to ints silently, and KeyError 'layers')
    for bad, words in (("hello", "prompts: give token ids \\(Tokenizer.encode\\), not text"),
                       (["hello"], "prompt 0: text 'hello'"), ([1, 5, 6], "prompts: a flat list of ids"),
                       ((p for p in []), "prompts: none given"), ([[1.9, 5.7]], "prompt 0: 1.9 is not a token id")):
        with pytest.raises(ValueError, match=f"generate: {words}"):
            gen.generate(CFG, params, bad, 4)
    with pytest.raises(ValueError, match=r"params is a \{'params': ...\} variables dict; pass its \['params'\]"):
        gen.generate(CFG, {"params": params}, [[1, 2]], 4)
    arrays = gen.generate(CFG, params, np.array([[1, 2, 3], [4, 5, 6]]), 3, eos_id=-1).tokens  # a 2-D array: rows
    assert arrays == gen.generate(CFG, params, [[1, 2, 3], [4, 5, 6]], 3, eos_id=-1).tokens
    assert arrays == gen.generate(CFG, params, jnp.array([[1, 2, 3], [4, 5, 6]]), 3, eos_id=-1).tokens  # jax, too
    assert arrays == gen.generate(CFG, params, [jnp.array([1, 2, 3]), np.array([4, 5, 6])], 3, eos_id=-1).tokens
    assert gen.generate(CFG, params, jnp.array([1, 2, 3]), 3, eos_id=-1).tokens == arrays[:1]  # one 1-D row
    with pytest.raises(ValueError, match="generate: prompt 0: True is not a token id"):
        gen.generate(CFG, params, [[True, 5]], 4)


def test_a_prompt_that_fits_only_unpadded_still_generates(params):
    """113 + 8 tokens fit the 128-token context, though 113 pads to a bucket of 128."""
    prompt = [1] + [(7 * i) % 300 + 3 for i in range(112)]
    out = gen.generate(CFG, params, [prompt], 8, eos_id=-1)
    assert out.tokens[0] == reference_greedy(params, prompt, 8)[0]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, params):
    d = tmp_path_factory.mktemp("ckpt")
    lines = [" ".join(random.Random(i).choice(synthetic.WORDS) for _ in range(10)) for i in range(300)]
    (d / "corpus.txt").write_text("\n".join(lines + ["[INST] <<SYS>> [/INST] 0123456789 ?!.,:"] * 5))
    tok = tk.train([str(d / "corpus.txt")], CFG.vocab_size, str(d / "tok.model"))
    out = d / "model"
    ckpt.save_params(str(out), params, {"model": CFG.to_dict(), "heads": ["lm"], "tokenizer": tok.identity()},
                     tokenizer_path=tok.path)
    return str(out), tok


def test_generate_cli_streams_the_continuation(checkpoint_dir, capsys, params):
    path, tok = checkpoint_dir
    assert gen.main([f"--checkpoint={path}", "--prompt=apple river", "--max_new_tokens=12", "--temperature=0"]) == 0
    printed = capsys.readouterr().out
    prompt = tok.encode("apple river", bos=True)
    expected = [t for t in gen.generate(CFG, params, [prompt], 12).tokens[0] if t != tk.EOS_ID]
    continuation = tok.decode(prompt + expected)[len(tok.decode(prompt)):]
    assert printed == "apple river" + continuation + "\n"
    # words streamed after a prompt keep their space (SentencePiece drops it at the start of a text)
    shown = io.StringIO()
    stream = gen.TextStream(tok, shown, prefix=prompt)
    for t in tok.encode("lemon tree"):
        stream(np.array([t]), np.array([False]))
    assert stream.finish() == shown.getvalue() == " lemon tree"
    # a run's workdir records the length it trained at: an answer that may run past it is noted
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"seq_len": 8}, f)
    try:
        assert gen.main([f"--checkpoint={path}", "--prompt=apple river", "--max_new_tokens=12",
                         "--temperature=0"]) == 0
        assert f"note: prompt and answer may reach {len(prompt) + 12} tokens, past the 8 that {path} trained at" in \
            capsys.readouterr().err
        prompts = os.path.join(os.path.dirname(path), "prompts.txt")
        with open(prompts, "w") as f:
            f.write("apple river\n")
        assert gen.main([f"--checkpoint={path}", f"--prompt_file={prompts}", "--max_new_tokens=12",
                         "--temperature=0"]) == 0
        assert "past the 8 that" in capsys.readouterr().err  # a prompt file's too
    finally:
        os.remove(os.path.join(path, "config.json"))


def test_generate_cli_reads_a_ppo_policy_with_its_value_head(checkpoint_dir, capsys, tmp_path):
    """A PPO run's checkpoint holds the value head beside the LM: inference uses the LM."""
    _, tok = checkpoint_dir
    both = random_params(CFG, heads=("lm", "value"), std=0.15, seed=3)
    ckpt.save_params(str(tmp_path / "ppo"), both, {"model": CFG.to_dict(), "heads": ["lm", "value"],
                                                   "tokenizer": tok.identity()}, tokenizer_path=tok.path)
    assert gen.main([f"--checkpoint={tmp_path / 'ppo'}", "--prompt=apple river", "--max_new_tokens=6",
                     "--temperature=0"]) == 0, capsys.readouterr().err
    lm = {k: v for k, v in both.items() if k != "value_head"}
    gen.generate(CFG, lm, [[1, 5]], 2)
    compiled = gen._generate._cache_size()
    gen.generate(CFG, both, [[1, 5]], 2)  # the LM's program: the value head is dropped, not traced again
    assert gen._generate._cache_size() == compiled
    prompt = tok.encode("apple river", bos=True)
    expected = [t for t in gen.generate(CFG, lm, [prompt], 6).tokens[0] if t != tk.EOS_ID]
    assert capsys.readouterr().out == "apple river" + tok.decode(prompt + expected)[len(tok.decode(prompt)):] + "\n"


def test_dtype_casts_the_weights_as_they_are_read(checkpoint_dir, capsys, params):
    """--dtype=bfloat16: the stored float32 weights arrive (and compute) in bfloat16."""
    path, tok = checkpoint_dir
    cfg, half, _, _ = gen.load_for_inference(path, "bfloat16")
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(half["norm"]["scale"], np.float32),
                                  np.asarray(params["norm"]["scale"].astype(jnp.bfloat16), np.float32))
    assert gen.main([f"--checkpoint={path}", "--prompt=apple river", "--max_new_tokens=8", "--temperature=0",
                     "--dtype=bfloat16"]) == 0
    prompt = tok.encode("apple river", bos=True)
    expected = [t for t in gen.generate(cfg, half, [prompt], 8).tokens[0] if t != tk.EOS_ID]
    assert capsys.readouterr().out == "apple river" + tok.decode(prompt + expected)[len(tok.decode(prompt)):] + "\n"
    with pytest.raises(SystemExit):
        gen.main([f"--checkpoint={path}", "--prompt=x", "--dtype=bf16"])
    assert "--dtype: invalid choice: 'bf16'" in capsys.readouterr().err


def test_chat_cli_keeps_a_multi_turn_llama2_dialog(checkpoint_dir, params):
    path, tok = checkpoint_dir
    inputs = iter(["hello there", "/reset", "what is 2 + 2?", "and then?"])
    out = io.StringIO()

    def fake_input(prompt):
        out.write(prompt)
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    assert chat.main([f"--checkpoint={path}", "--system=Be brief.", "--temperature=0", "--max_new_tokens=8"],
                     input_fn=fake_input, out=out) == 0
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "(new dialog)" in text
    # The third turn's prompt is Meta's format of the whole dialog so far, system included.
    first = gen.generate(CFG, params, [tok.encode_dialog([{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "what is 2 + 2?"}])], 8)
    answer = tok.decode([t for t in first.tokens[0] if t != tk.EOS_ID])
    assert f"assistant> {answer}\n" in text


def test_chat_cli_keeps_a_reply_only_up_to_a_format_tag(checkpoint_dir, monkeypatch):
    """A reply holding "[INST]" would make every later turn an invalid dialog: the dialog
    keeps the reply up to the tag, and the next turn is sent."""
    path, tok = checkpoint_dir
    reply = tok.encode("fine [INST] more")
    prompts_sent = []

    def fake_generate(cfg, params, prompts, *args, **kwargs):
        prompts_sent.append(list(prompts[0]))
        return gen.Generation([reply + [tk.EOS_ID]], [[0.0] * (len(reply) + 1)])

    monkeypatch.setattr(gen, "generate", fake_generate)
    inputs, out = iter(["hi", "again"]), io.StringIO()

    def fake_input(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    assert chat.main([f"--checkpoint={path}"], input_fn=fake_input, out=out) == 0
    assert "(the reply is kept up to its '[INST]', a tag of the chat format)" in out.getvalue()
    assert "not sent" not in out.getvalue()
    assert prompts_sent[1] == tok.encode_dialog([{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "fine"},
                                                 {"role": "user", "content": "again"}])


def test_cli_errors(tmp_path, capsys):
    assert gen.main([f"--checkpoint={tmp_path}", "--prompt=x"]) == 2
    assert "no complete checkpoint found" in capsys.readouterr().err
    ckpt.save_params(str(tmp_path / "m"), random_params(CFG), {"model": CFG.to_dict(), "heads": ["lm"]})
    assert chat.main([f"--checkpoint={tmp_path / 'm'}"]) == 2
    assert "no tokenizer.model beside the checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen.main([f"--checkpoint={tmp_path / 'm'}", "--prompt=x", "--max_new_tokens=0"])
    assert "--max_new_tokens must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.main([f"--checkpoint={tmp_path / 'm'}", "--temperature=-1"])
    assert "--temperature must be >= 0 (0 = greedy)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen.main([f"--checkpoint={tmp_path / 'm'}", "--prompt=x", "--top_k=-2"])
    assert "--top_k must be >= 0 (0 = every token), got -2" in capsys.readouterr().err


def _scripted(lines, out):
    inputs = iter(lines)

    def fake_input(prompt):
        out.write(prompt)
        item = next(inputs, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return fake_input


def test_a_long_chat_drops_its_oldest_exchanges_and_compiles_a_few_programs(checkpoint_dir, monkeypatch, capsys):
    """A dialog that outgrows the 128-token context drops its oldest exchanges (the system
    prompt stays) instead of refusing every message; its growing prompts are padded to a
    few lengths, so the turns do not each compile a decode program."""
    path, tok = checkpoint_dir
    sent, shapes, real = [], [], gen.generate

    def recording(cfg, params, prompts, max_new, *args, **kwargs):
        sent.append(list(prompts[0]))
        shapes.append((kwargs["pad_to"], max_new))
        return real(cfg, params, prompts, max_new, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", recording)
    rng = random.Random(0)
    words = [" ".join(rng.choice(synthetic.WORDS) for _ in range(6)) for _ in range(9)]
    out = io.StringIO()
    compiled = gen._generate._cache_size()
    assert chat.main([f"--checkpoint={path}", "--system=Be brief.", "--temperature=0", "--max_new_tokens=8"],
                     input_fn=_scripted(words, out), out=out) == 0
    text = out.getvalue()
    assert text.count("assistant> ") == 9 and "not sent" not in text
    assert "oldest exchange dropped to fit the context of 128 tokens; the system prompt stays)" in text
    assert all(len(p) + 8 <= 128 for p in sent)
    assert all(tok.decode(p).startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>") for p in sent)  # the system stays
    assert {pad for pad, _ in shapes} <= {16, 32, 64, 128 - 8}  # powers of two, or what the context leaves
    assert gen._generate._cache_size() - compiled <= 4
    # replies longer than a quarter of the context: the room left varies turn by turn, and the reply's length
    # (a static shape) is rounded down to a multiple of a quarter of its power of two, so turns share programs
    compiled, out, shapes[:] = gen._generate._cache_size(), io.StringIO(), []
    long_words = [" ".join(rng.choice(synthetic.WORDS) for _ in range(35)) for _ in range(6)]
    assert chat.main([f"--checkpoint={path}", "--temperature=0", "--max_new_tokens=64"],
                     input_fn=_scripted(long_words, out), out=out) == 0
    assert out.getvalue().count("assistant> ") == 6
    lengths = {n for _, n in shapes}
    assert min(lengths) < 64 and all(n in (1, 2, 4, 8, 16, 32, 48, 64) for n in lengths), shapes  # rounded down
    assert [chat.reply_length(r) for r in (5, 17, 45, 63, 100, 255)] == [4, 16, 32, 48, 96, 224]  # 64 up: < 1/4 lost
    assert gen._generate._cache_size() - compiled <= 2 * len(set(shapes))
    # a run's workdir: the context is the length it trained at (past it, replies were blank), or --context
    trained = os.path.join(os.path.dirname(path), "trained_at_64")
    if not os.path.exists(trained):
        shutil.copytree(path, trained)
        with open(os.path.join(trained, "config.json"), "w") as f:
            json.dump({"seq_len": 64}, f)
    longest = {}
    for flags, context in (([], 64), (["--context=128"], 128)):
        sent[:] = []
        assert chat.main([f"--checkpoint={trained}", "--temperature=0", "--max_new_tokens=8", *flags],
                         input_fn=_scripted(words, io.StringIO()), out=io.StringIO()) == 0
        longest[context] = max(len(p) for p in sent)
    assert longest[64] + 8 <= 64 < longest[128] + 8 <= 128
    assert "context 64: the length the run trained at; --context up to the model's 128" in capsys.readouterr().err
    assert chat.main([f"--checkpoint={trained}", "--context=129"], input_fn=_scripted([], io.StringIO()),
                     out=io.StringIO()) == 2
    assert "--context=129: the model's max_seq_len is 128" in capsys.readouterr().err


def test_chat_ctrl_c_drops_a_reply_or_quits_and_odd_input_is_handled(checkpoint_dir, monkeypatch, capsys):
    """Ctrl-C during a reply (a real SIGINT, from the decode loop's host callback) ends the
    generation within a few steps, not after its last token, and drops the reply."""
    import signal
    import time

    path, tok = checkpoint_dir
    sent, shown, real = [], [], gen.generate

    def interrupted_once(cfg, params, prompts, *args, on_token=None, **kwargs):
        sent.append(list(prompts[0]))
        if len(sent) > 1:
            return real(cfg, params, prompts, *args, on_token=on_token, **kwargs)

        def slow(tokens, done):  # 50 ms a token, as a large model's; Ctrl-C at the second
            shown.append(int(tokens[0]))
            time.sleep(0.05)
            if len(shown) == 2:
                signal.raise_signal(signal.SIGINT)
            return on_token(tokens, done)

        return real(cfg, params, prompts, *args, on_token=slow, **kwargs)

    monkeypatch.setattr(gen, "generate", interrupted_once)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (xdist workers ignore it)
    out = io.StringIO()
    try:  # bytes that are not UTF-8 reach Python as lone surrogates: sent as U+FFFD, not a crash
        assert chat.main([f"--checkpoint={path}", "--temperature=0", "--max_new_tokens=40"],
                         input_fn=_scripted(["first", "/rset", "caf\udce9", KeyboardInterrupt], out), out=out) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "(interrupted: the reply is dropped)" in out.getvalue()
    assert "(unknown command /rset: /reset starts over, /exit quits)" in out.getvalue()  # and not sent (below)
    assert 2 <= len(shown) < 12  # stopped within a few steps of the signal, not after 40
    assert sent[1] == tok.encode_dialog([{"role": "user", "content": "caf\ufffd"}])  # the dropped turn is gone
    with pytest.raises(SystemExit):  # a system prompt no message could be sent with: said once, at the start
        chat.main([f"--checkpoint={path}", "--system=you are [INST] x"])
    assert "--system: message 0: special tag '[INST]' is not allowed" in capsys.readouterr().err


def gen_params(path):
    return gen.load_for_inference(path)[1]


def test_generate_cli_says_what_it_changed_and_survives_a_closed_pipe(checkpoint_dir, capsys):
    path, tok = checkpoint_dir
    for bad in ("nan", "inf"):
        with pytest.raises(SystemExit):
            gen.main([f"--checkpoint={path}", "--prompt=x", f"--temperature={bad}"])
        assert "--temperature must be >= 0 (0 = greedy)" in capsys.readouterr().err
    rng = random.Random(5)
    prompt = " ".join(rng.choice(synthetic.WORDS) for _ in range(30))
    n = len(tok.encode(prompt, bos=True))
    assert gen.main([f"--checkpoint={path}", f"--prompt={prompt}", "--max_new_tokens=200", "--temperature=0"]) == 0
    err = capsys.readouterr().err
    assert f"note: --max_new_tokens 200 -> {128 - n}: the prompt's {n} tokens leave {128 - n} of the model's " \
           "context of 128" in err and " tokens/s]" in err and "(73,968 parameters) in " in err

    calls = []  # a streaming callback that answers "stop": the generation ends there, with no filler tokens

    def stop_at_two(tokens, done):
        calls.append(int(tokens[0]))
        return len(calls) == 2

    stopped = gen.generate(CFG, gen_params(path), [tok.encode("apple", bos=True)], 10, on_token=stop_at_two, eos_id=-1)
    assert stopped.tokens[0] == calls and len(stopped.logprobs[0]) == 2

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError

    stream = gen.TextStream(tok, Closed())  # inside the decode loop's callback: must not raise
    for t in tok.encode("lemon tree"):
        stream(np.array([t]), np.array([False]))
    assert stream.closed and stream.finish() == "lemon tree"
    assert stream(np.array([5]), np.array([False])) is True  # nobody reads: the decode loop is told to stop
    assert tok.encode("caf\udce9") == tok.encode("caf\ufffd")  # what a terminal's bad bytes encode as


def test_generate_cli_batches_a_prompt_file_into_json_lines(checkpoint_dir, capsys, params, tmp_path):
    import json

    path, tok = checkpoint_dir
    f = tmp_path / "prompts.txt"
    f.write_text('\ufeffapple river\n\n{"prompt": "lemon tree", "id": 7}\nstone\\nwater\n')  # a BOM is no text
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}", "--batch_size=2", "--max_new_tokens=6",
                     "--temperature=0"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["apple river", "lemon tree", "stone\nwater"]
    assert rows[1]["id"] == 7 and "id" not in rows[0]  # a JSON prompt's other fields are kept
    assert f"loaded {path}" in out.err and "[3 prompts, " in out.err
    for r in rows:  # each the greedy continuation of its prompt alone, as text that follows the prompt's
        prompt = tok.encode(r["prompt"], bos=True)
        new = gen.generate(CFG, params, [prompt], 6).tokens[0]
        assert r["new_tokens"] == len(new) and r["finished"] == (new[-1] == tk.EOS_ID)
        assert r["stopped"] == ("eos" if r["finished"] else "max_new_tokens")
        assert r["completion"] == tok.decode(prompt + [t for t in new if t != tk.EOS_ID])[len(r["prompt"]):]
    # decoded alone, a continuation loses the space SentencePiece drops at the start of a text
    assert gen.completion_text(tok, tok.encode("apple", bos=True), tok.encode("river"), chat=False) == " river"
    assert gen.completion_text(tok, tok.encode("apple", bos=True), tok.encode("river") + [tk.EOS_ID], True) == "river"
    # dialogs (a system prompt, several turns) in the Llama 2-Chat format, with --system before those without one
    dialogs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "apple"}],
               [{"role": "user", "content": "stone"}, {"role": "assistant", "content": "water"},
                {"role": "user", "content": "river"}]]
    f.write_text("".join(json.dumps({"messages": d, "id": i}) + "\n" for i, d in enumerate(dialogs)))
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}", "--max_new_tokens=5", "--temperature=0",
                     "--system=say yes"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["messages"] for r in rows] == dialogs and [r["id"] for r in rows] == [0, 1]
    for d, r in zip([dialogs[0], [{"role": "system", "content": "say yes"}] + dialogs[1]], rows):
        new = gen.generate(CFG, params, [tok.encode_dialog(d)], 5).tokens[0]
        assert r["completion"] == tok.decode([t for t in new if t != tk.EOS_ID])
    # a top-level "system" is the dialog's system prompt; a plain line with --system but no --chat is refused
    f.write_text(json.dumps({"system": "be kind", "messages": dialogs[1][:1]}) + "\n")
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}", "--max_new_tokens=5", "--temperature=0"]) == 0
    new = gen.generate(CFG, params, [tok.encode_dialog([{"role": "system", "content": "be kind"}, dialogs[1][0]])],
                       5).tokens[0]
    assert json.loads(capsys.readouterr().out)["completion"] == tok.decode([t for t in new if t != tk.EOS_ID])
    f.write_text(json.dumps({"messages": dialogs[1][:1]}) + "\nplain words\n")
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}", "--system=x y"]) == 2
    assert f"{f}:2: a plain-text prompt, which --system does not apply to" in capsys.readouterr().err
    f.write_text(json.dumps({"messages": dialogs[1][:2]}) + "\n")
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}"]) == 2
    assert f"{f}:1: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen.main([f"--checkpoint={path}", "--prompt=x", "--system=be brief"])
    assert "--system is a Llama 2-Chat system prompt: it needs --chat" in capsys.readouterr().err
    f.write_text("a\n" + "river " * 60 + "\n")  # the long prompt leaves the short one less room than asked
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}", "--batch_size=2", "--max_new_tokens=100",
                     "--temperature=0"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    room = CFG.max_seq_len - len(tok.encode("river " * 60, bos=True))
    # the short prompt stopped by the batch's room; the long one by the model's context, full
    assert [r["stopped"] for r in rows] == ["eos" if rows[0]["finished"] else "batch",
                                           "eos" if rows[1]["finished"] else "context"]
    assert all(r["new_tokens"] <= room for r in rows)
    assert rows[0]["finished"] or f"(\"stopped\": \"batch\"; first: {f}:1)" in out.err
    assert rows[1]["finished"] or f"(\"stopped\": \"context\"; first: {f}:2): they reached the model's context" \
        in out.err
    f.write_text('ok\n{"text": "no prompt field"}\n')
    assert gen.main([f"--checkpoint={path}", f"--prompt_file={f}"]) == 2
    assert f"{f}:2: needs a string field \"prompt\"" in capsys.readouterr().err


def test_chat_says_when_a_reply_is_empty(checkpoint_dir, monkeypatch):
    """A reply that is EOS at once is said, not an empty `assistant>` line."""
    import types

    path, tok = checkpoint_dir

    def at_once(stream, cfg, params, prompts, max_new, *args, **kwargs):
        return types.SimpleNamespace(tokens=[[tok.eos_id]])

    monkeypatch.setattr(gen, "generate_interruptibly", at_once)
    out = io.StringIO()
    assert chat.main([f"--checkpoint={path}", "--temperature=0"], input_fn=_scripted(["hello"], out), out=out) == 0
    assert "assistant> \n(an empty reply: the model ended it at once)" in out.getvalue()
