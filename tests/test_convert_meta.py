"""Meta import/export and Hugging Face export, against real `transformers` and the frozen
NumPy port of Meta's model.py."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import reference
import torch
import transformers
from helpers import run
from test_convert_hf import hf_logits, make_hf

from llama_jax import checkpoint as ckpt
from llama_jax import convert
from llama_jax.convert import ConversionError
from llama_jax.model import Llama, LlamaConfig, meta_ffn_hidden_dim

TOKENS = np.random.default_rng(3).integers(0, 131, size=(2, 15))
# Meta's params.json can only describe FFN widths from its formula: 2*4*60/3 = 160 -> 192.
META_HF = dict(intermediate_size=192, vocab_size=132)  # vocab split over 2 shards: even


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model, path = make_hf(tmp_path_factory.mktemp("hf"), seed=5, **META_HF)
    cfg, params = convert.from_hf(path, multiple_of=64)
    assert cfg.hidden_dim == 192
    return model, cfg.replace(ffn_hidden_dim=None), params


def test_meta_export_is_meta_layout_and_reimports(tmp_path, hf):
    model, cfg, params = hf
    theirs = hf_logits(model, TOKENS)
    one, two = tmp_path / "meta1", tmp_path / "meta2"
    convert.to_meta(params, cfg, str(one))
    convert.to_meta(params, cfg, str(two), num_shards=2)

    # The single shard, read by an independent port of Meta's forward pass, gives HF's logits.
    state = {k: v.double().numpy() for k, v in torch.load(one / "consolidated.00.pth", weights_only=True).items()}
    meta_json = json.load(open(one / "params.json"))
    assert meta_json["n_kv_heads"] == 2 and meta_json["multiple_of"] == 64
    ref = reference.forward(state, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.norm_eps, cfg.rope_theta, TOKENS[0])
    assert np.abs(ref - theirs[0]).max() < 1e-4

    # Two model-parallel shards split the way Meta's layout does.
    s0 = torch.load(two / "consolidated.00.pth", weights_only=True)
    assert tuple(s0["layers.0.attention.wq.weight"].shape) == (30, 60)  # rows split
    assert tuple(s0["layers.0.attention.wk.weight"].shape) == (10, 60)  # one kv head each
    assert tuple(s0["layers.0.attention.wo.weight"].shape) == (60, 30)  # columns split
    assert tuple(s0["tok_embeddings.weight"].shape) == (132, 30)  # columns split
    assert tuple(s0["layers.0.ffn_norm.weight"].shape) == (60,)  # replicated

    cfg1, p1 = convert.from_meta(str(one))
    cfg2, p2 = convert.from_meta(str(two))
    assert cfg1 == cfg2 and cfg1.vocab_size == 132 and cfg1.kv_heads == 2
    l1 = np.asarray(run(Llama(cfg1), p1, TOKENS))
    l2 = np.asarray(run(Llama(cfg2), p2, TOKENS))
    np.testing.assert_array_equal(l1, l2)  # 2 shards import to exactly the single-shard model
    assert np.abs(l1 - theirs).max() < 1e-4


def test_meta_export_finds_params_json_fields_for_an_hf_import(tmp_path, hf):
    """An HF import records only the FFN width (its multiple_of is the default 256): the
    export finds Meta's own fields for the released shapes (70B: 4096 / 1.3, which the
    default cannot give) and a multiplier for others, checked by Meta's forward."""
    model, cfg, params = hf
    for preset, fields in (("llama2_7b", (256, None)), ("llama2_13b", (256, None)), ("llama2_70b", (4096, 1.3))):
        c = getattr(LlamaConfig, preset)()
        as_hf = c.replace(multiple_of=256, ffn_dim_multiplier=None, ffn_hidden_dim=c.hidden_dim)
        assert convert.meta_ffn(as_hf) == fields and meta_ffn_hidden_dim(c.dim, *fields) == c.hidden_dim
    as_hf = cfg.replace(multiple_of=256, ffn_hidden_dim=192)  # 256 alone would give 256
    convert.to_meta(params, as_hf, str(tmp_path / "meta"))
    meta_json = json.load(open(tmp_path / "meta" / "params.json"))
    assert (meta_json["multiple_of"], meta_json["ffn_dim_multiplier"]) == (64, 1.2)
    state = {k: v.double().numpy() for k, v in torch.load(tmp_path / "meta" / "consolidated.00.pth",
                                                           weights_only=True).items()}
    ref = reference.forward(state, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.norm_eps, cfg.rope_theta, TOKENS[0])
    assert np.abs(ref - hf_logits(model, TOKENS)[0]).max() < 1e-4
    assert convert.from_meta(str(tmp_path / "meta"))[0].hidden_dim == 192
    for width in (97, 100, 11001, 28673):  # odd ones too, with multiple_of 1
        c = cfg.replace(ffn_hidden_dim=width)
        assert meta_ffn_hidden_dim(c.dim, *convert.meta_ffn(c)) == width


def test_hf_export_loads_in_transformers(tmp_path, hf):
    """One model.safetensors, or files of at most --max_shard_size with save_pretrained's
    index; transformers and our import read both."""
    _, cfg, params = hf
    ours = np.asarray(run(Llama(cfg), params, TOKENS))
    layer = sum(np.asarray(x[0]).nbytes for x in jax.tree_util.tree_leaves(params["layers"]))
    limit = layer * 3 // 2
    for out, size in (("one", convert.HF_SHARD_SIZE), ("split", f"{limit / 1e3}KB")):
        convert.to_hf(params, cfg, str(tmp_path / out), max_shard_size=size)
        loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / out)).eval()
        assert np.abs(ours - hf_logits(loaded, TOKENS)).max() < 1e-4
        reimported = convert.from_hf(str(tmp_path / out))[1]
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(reimported),
                                                        jax.tree_util.tree_leaves(params)))
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    mask = os.umask(0o022)
    os.umask(mask)  # (the umask, read)
    modes = {f: os.stat(tmp_path / "one" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "one")}
    assert modes == {f: 0o666 & ~mask for f in modes}  # the weights too (safetensors writes them 0600)
    index = json.load(open(tmp_path / "split" / "model.safetensors.index.json"))
    files = sorted(f for f in os.listdir(tmp_path / "split") if f.endswith(".safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tensors = convert.hf_tensors_from_params(params, cfg)
    assert list(index["weight_map"]) == list(tensors) and index["metadata"]["total_size"] == sum(
        t.nbytes for t in tensors.values())
    held = {f: [name for name, file in index["weight_map"].items() if file == f] for f in files}
    for i, f in enumerate(files):  # filled in order, each as full as the limit allows
        size = sum(tensors[name].nbytes for name in held[f])
        assert size <= limit and (i == n - 1 or size + tensors[held[files[i + 1]][0]].nbytes > limit)
    assert convert.hf_files(cfg, max_shard_size=1) == [[n] for n, _ in convert._hf_shapes(cfg)]  # no empty file
    for bad in ("five", "0", "-3GB", "GB", "inf", "nan"):
        with pytest.raises(ConversionError, match=f"--max_shard_size={bad}: "):
            convert.parse_size(bad)
    assert [convert.parse_size(s) for s in ("5GB", "2GiB", "500 MB", "1000")] == [5e9, 2**31, 5e8, 1000]


def test_hf_export_tokenizes_and_formats_chats_as_llama_jax(tmp_path, hf, tokenizer_path, capsys):
    """The exported tokenizer gives SentencePiece's ids in transformers, leading spaces
    included (converted from tokenizer.model alone, transformers dropped them), and its chat
    template renders Meta's Llama 2-Chat format token for token. A tokenizer trained with
    other settings than Llama 2's, which tokenizer.json's layout does not reproduce, is
    warned about."""
    import random

    import sentencepiece as spm

    from llama_jax.tokenizer import Tokenizer

    _, cfg, params = hf

    def export(path, dst):
        n = Tokenizer(path).vocab_size
        big = {**params, "tok_embeddings": {"embedding": np.zeros((n, cfg.dim), np.float32)},
               "output": np.zeros((cfg.dim, n), np.float32)}
        convert.to_hf(big, cfg.replace(vocab_size=n), str(dst), path)
        return capsys.readouterr().err

    text = tmp_path / "text.txt"
    text.write_text("".join(f"the  cat {i} sat on the mat, caf\u00e9 \ufb01ne\n" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "uni"), vocab_size=40,
                                   minloglevel=2)  # SentencePiece's defaults: unigram, NFKC, spaces squeezed
    said = export(str(tmp_path / "uni.model"), tmp_path / "uni_out")
    assert (f"warning: {tmp_path / 'uni_out' / 'tokenizer.json'}: transformers' tokenizer gives other ids than "
            "SentencePiece for" in said and "settings other than Llama 2's (model_type, " in said), said
    tok = Tokenizer(tokenizer_path)
    assert "warning" not in export(tokenizer_path, tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in ("  leading spaces", " x", "   ", "a\nb  c", "x  y ", "naïve 日本 🙂", "[INST] hi [/INST]"):
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert theirs.decode(theirs.encode(text, add_special_tokens=False)) == text, text
    assert theirs("the cat").input_ids == tok.encode("the cat", bos=True)  # BOS added, as Llama 2's
    rng = random.Random(0)
    words = ["the", " cat", "sat  ", "42", "  on", "mat\n", "x"]
    for _ in range(20):
        turns = rng.randint(1, 3)
        dialog = ([{"role": "system", "content": "".join(rng.choices(words, k=3))}] if rng.random() < 0.5 else [])
        for t in range(turns):
            dialog.append({"role": "user", "content": "".join(rng.choices(words, k=4))})
            if t < turns - 1:
                dialog.append({"role": "assistant", "content": "".join(rng.choices(words, k=3))})
        ids = theirs.apply_chat_template(dialog, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok.encode_dialog(dialog), dialog


def test_cli_imports_and_exports_llama_jax_checkpoints(tmp_path, hf, capsys, tokenizer_path):
    model, cfg, params = hf
    meta_dir = tmp_path / "meta"
    convert.to_meta(params, cfg, str(meta_dir), num_shards=2)
    assert convert.main(["--from=meta", f"--src={meta_dir}", f"--dst={tmp_path / 'ckpt'}",
                         f"--tokenizer={tmp_path / 'nope.model'}"]) == 2
    assert f"--tokenizer {tmp_path / 'nope.model'}: no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ckpt")  # refused before anything was written
    assert convert.main(["--from=meta", f"--src={meta_dir}", f"--dst={tmp_path / 'ckpt'}"]) == 0
    assert "warning: no tokenizer.model in" in capsys.readouterr().err  # generate would need one: said now
    cfg2, params2, heads, tok = ckpt.load_model(str(tmp_path / "ckpt"))
    assert cfg2 == cfg.replace(max_seq_len=4096) and heads == ("lm",) and tok is None  # Meta: no max_seq_len
    assert convert.main(["--to=hf", f"--src={tmp_path / 'ckpt'}", f"--dst={tmp_path / 'hf_out'}"]) == 0
    assert (f"note: no tokenizer.model in {tmp_path / 'ckpt'}: the export has no tokenizer files; bundle one with "
            "--tokenizer=PATH") in capsys.readouterr().err
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf_out")).eval()
    assert np.abs(hf_logits(loaded, TOKENS) - hf_logits(model, TOKENS)).max() < 1e-4
    assert convert.main(["--from=meta", f"--src={meta_dir}", f"--dst={tmp_path / 'ckpt'}"]) == 2
    assert f"{tmp_path / 'ckpt'}: not empty" in capsys.readouterr().err
    # a tokenizer other than the one the checkpoint was trained with is refused (its ids would mean other words)
    cfg3, params3, _, _ = ckpt.load_model(str(tmp_path / "ckpt"))
    wide = {**params3, "tok_embeddings": {"embedding": np.zeros((512, cfg3.dim), np.float32)},
            "output": np.zeros((cfg3.dim, 512), np.float32)}
    from llama_jax.tokenizer import Tokenizer

    ckpt.save_params(str(tmp_path / "trained"), wide, {"model": cfg3.replace(vocab_size=512).to_dict(),
                                                         "tokenizer": {**Tokenizer(tokenizer_path).identity(),
                                                                       "sha256": "0" * 64}})
    assert convert.main(["--to=hf", f"--src={tmp_path / 'trained'}", f"--dst={tmp_path / 'hf3'}",
                         f"--tokenizer={tokenizer_path}"]) == 2
    assert f"--tokenizer {tokenizer_path}: not the tokenizer {tmp_path / 'trained'} was trained with" in \
        capsys.readouterr().err and not os.path.exists(tmp_path / "hf3")
    # the same, found beside the checkpoint, names no flag the user did not pass; a PPO policy's value head is not
    # exported, and the export says so; Meta's loader, which takes the vocabulary from the tokenizer, is warned for
    with_value = {**wide, "value_head": {"kernel": np.zeros((cfg3.dim, 1), np.float32),
                                         "bias": np.zeros(1, np.float32)}}
    ckpt.save_params(str(tmp_path / "ppo"), with_value, {"model": cfg3.replace(vocab_size=512).to_dict(),
                                                         "heads": ["lm", "value"],
                                                         "tokenizer": {**Tokenizer(tokenizer_path).identity(),
                                                                       "sha256": "0" * 64}},
                     tokenizer_path=tokenizer_path)
    assert convert.main(["--to=hf", f"--src={tmp_path / 'ppo'}", f"--dst={tmp_path / 'hf3'}"]) == 2
    assert (f"{tmp_path / 'ppo' / 'tokenizer.model'} (the checkpoint's own tokenizer.model): not the tokenizer "
            f"{tmp_path / 'ppo'} was trained with") in capsys.readouterr().err
    shutil.rmtree(tmp_path / "ppo")
    ckpt.save_params(str(tmp_path / "ppo"), with_value, {"model": cfg3.replace(vocab_size=512).to_dict(),
                                                         "heads": ["lm", "value"]}, tokenizer_path=tokenizer_path)
    assert convert.main(["--to=hf", f"--src={tmp_path / 'ppo'}", f"--dst={tmp_path / 'hf3'}"]) == 0
    assert f"note: {tmp_path / 'ppo'}'s value head is not exported" in capsys.readouterr().err
    assert convert.main(["--to=meta", f"--src={tmp_path / 'ppo'}", f"--dst={tmp_path / 'm3'}"]) == 0
    assert "warning" not in capsys.readouterr().err  # 512 pieces, 512 words
    wider = {**wide, "tok_embeddings": {"embedding": np.zeros((520, cfg3.dim), np.float32)},
             "output": np.zeros((cfg3.dim, 520), np.float32)}
    ckpt.save_params(str(tmp_path / "wider"), wider, {"model": cfg3.replace(vocab_size=520).to_dict()},
                     tokenizer_path=tokenizer_path)
    assert convert.main(["--to=meta", f"--src={tmp_path / 'wider'}", f"--dst={tmp_path / 'm4'}"]) == 0
    assert (f"warning: {tmp_path / 'm4'}: params.json vocab_size 520, but tokenizer.model has 512 pieces: Meta's "
            "loader") in capsys.readouterr().err
    # an export checks the tokenizer it bundles before writing anything (512 pieces > 132 words)
    assert convert.main(["--to=hf", f"--src={tmp_path / 'ckpt'}", f"--dst={tmp_path / 'hf2'}",
                         f"--tokenizer={tokenizer_path}"]) == 2
    assert "tokenizer vocabulary 512 is larger than" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf2")
    with pytest.raises(SystemExit):  # flags of the other direction are refused, not ignored
        convert.main(["--to=hf", f"--src={tmp_path / 'ckpt'}", f"--dst={tmp_path / 'hf2'}", "--num_shards=2"])
    assert "--num_shards is for --to=meta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(["--from=meta", f"--src={meta_dir}", f"--dst={tmp_path / 'c3'}", "--dtype=bfloat16"])
    assert "--dtype is for exports" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(["--to=meta", f"--src={tmp_path / 'ckpt'}", f"--dst={tmp_path / 'm2'}", "--max_shard_size=1GB"])
    assert "--max_shard_size is for --to=hf" in capsys.readouterr().err
    assert convert.main(["--to=hf", f"--src={tmp_path / 'ckpt'}", f"--dst={tmp_path / 'hf2'}",
                         "--max_shard_size=5 bytes"]) == 2
    assert "--max_shard_size=5 bytes: not a size" in capsys.readouterr().err and not os.path.exists(tmp_path / "hf2")
    assert convert.main(["--to=hf", f"--src={tmp_path / 'none'}", f"--dst={tmp_path / 'hf2'}",
                         "--max_shard_size=5 bytes"]) == 2  # checked before any checkpoint is read
    assert "--max_shard_size=5 bytes: not a size" in capsys.readouterr().err
    # Meta's downloads keep tokenizer.model beside the model directories: found there (and
    # checked: this one's 512 pieces do not fit the 132-word model)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    assert convert.main(["--from=meta", f"--src={meta_dir}", f"--dst={tmp_path / 'ckpt2'}"]) == 2
    assert f"{tmp_path / 'tokenizer.model'}: tokenizer vocabulary" in capsys.readouterr().err


def test_bad_meta_directories_are_clear_errors(tmp_path, hf):
    _, cfg, params = hf
    d = tmp_path / "m"
    convert.to_meta(params, cfg, str(d), num_shards=2)
    os.rename(d / "consolidated.01.pth", d / "consolidated.02.pth")
    with pytest.raises(ConversionError, match=r"not numbered 00..01 \(missing \['consolidated.01.pth'\]\)"):
        convert.from_meta(str(d))
    os.rename(d / "consolidated.02.pth", d / "consolidated.01.pth")
    pj = json.load(open(d / "params.json"))
    json.dump({**pj, "use_scaled_rope": True}, open(d / "params.json", "w"))
    with pytest.raises(ConversionError, match="use_scaled_rope"):
        convert.from_meta(str(d))
    json.dump({**pj, "multiple_of": 256}, open(d / "params.json", "w"))
    with pytest.raises(ConversionError, match="FFN width of 256, but the checkpoint's w1 has 192 rows"):
        convert.from_meta(str(d))
    json.dump(pj, open(d / "params.json", "w"))  # the last shard gone: said as such, not as an FFN width
    os.rename(d / "consolidated.01.pth", tmp_path / "consolidated.01.pth")
    with pytest.raises(ConversionError, match=r"the 1 consolidated.NN.pth files hold 30 of the 60 embedding columns "
                                              r"\(params.json dim\): model-parallel shards are missing \(each holds 30 "
                                              r"columns: 2 shards in all\?\)"):
        convert.from_meta(str(d))
    os.rename(tmp_path / "consolidated.01.pth", d / "consolidated.01.pth")
    os.remove(d / "params.json")
    with pytest.raises(ConversionError, match="params.json: missing"):
        convert.from_meta(str(d))
    with pytest.raises(ConversionError, match="cannot be split into 4 model-parallel shards"):
        convert.to_meta(params, cfg, str(tmp_path / "x"), num_shards=4)
    for export in (convert.to_meta, convert.to_hf):  # another export's files would be read as this one's
        with pytest.raises(ConversionError, match=f"{d}: not empty; choose a new or empty destination"):
            export(params, cfg, str(d))


def test_exports_in_half_precision_and_meta_params_json(tmp_path, hf):
    """--dtype writes the released checkpoints' storage types; params.json names rope_theta
    only when it is not Llama 2's 10000 (Llama 2's ModelArgs has no such field)."""
    model, cfg, params = hf
    convert.to_hf(params, cfg, str(tmp_path / "hf16"), dtype="bfloat16")
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf16"), torch_dtype=torch.float32).eval()
    assert json.load(open(tmp_path / "hf16" / "config.json"))["torch_dtype"] == "bfloat16"
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # read back from bfloat16:
    w = loaded.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(w, w.astype(ml_dtypes.bfloat16).astype(np.float32))  # exactly bfloat16 values
    assert np.abs(hf_logits(loaded, TOKENS) - hf_logits(model, TOKENS)).max() < 0.1
    convert.to_meta(params, cfg, str(tmp_path / "m16"), num_shards=2, dtype="float16")
    s0 = torch.load(tmp_path / "m16" / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in s0.values()} == {torch.float16}
    assert "rope_theta" not in json.load(open(tmp_path / "m16" / "params.json"))
    convert.to_meta(params, cfg.replace(rope_theta=5e5), str(tmp_path / "m5"))
    assert json.load(open(tmp_path / "m5" / "params.json"))["rope_theta"] == 5e5
    assert convert.from_meta(str(tmp_path / "m5"))[0].rope_theta == 5e5


def test_a_failed_write_leaves_nothing_behind(tmp_path, hf, monkeypatch, capsys):
    """A full disk mid-export: one error line, and neither a half-written destination nor a
    staging directory is left to block the rerun."""
    _, cfg, params = hf
    real_save = torch.save
    calls = []

    def save_then_fail(obj, path):
        calls.append(path)
        real_save(obj, path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(ConversionError, match=r"meta: writing failed, nothing was written \(RuntimeError: "):
        convert.to_meta(params, cfg, str(tmp_path / "meta"), num_shards=2)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(torch, "save", real_save)
    os.makedirs(tmp_path / "meta")  # an empty destination is fine
    convert.to_meta(params, cfg, str(tmp_path / "meta"), num_shards=2)
    assert sorted(os.listdir(tmp_path / "meta")) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    assert os.listdir(tmp_path) == ["meta"]
    with pytest.raises(ConversionError, match="--num_shards=0: must be at least 1"):
        convert.to_meta(params, cfg, str(tmp_path / "x"), num_shards=0)
    ckpt.save_params(str(tmp_path / "ck"), params, {"model": cfg.to_dict(), "heads": ["lm"]})
    assert convert.main(["--to=meta", f"--src={tmp_path / 'ck'}", f"--dst={tmp_path / 'x'}", "--num_shards=0"]) == 2
    assert "--num_shards=0: must be at least 1" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "ck")
    # the same for params-only checkpoints (imports, `checkpoint export`): a file as --output is one line
    open(tmp_path / "a_file", "w").close()
    with pytest.raises(ckpt.CheckpointError, match="a_file: exists and is not a directory"):
        ckpt.save_params(str(tmp_path / "a_file"), params, {"model": cfg.to_dict(), "heads": ["lm"]})
    monkeypatch.setattr(ckpt.ocp.args, "StandardSave", lambda _: 1 / 0)
    with pytest.raises(ckpt.CheckpointError, match="ckpt: writing failed, nothing was written \\(ZeroDivisionError"):
        ckpt.save_params(str(tmp_path / "ckpt"), params, {"model": cfg.to_dict(), "heads": ["lm"]})
    assert sorted(os.listdir(tmp_path)) == ["a_file", "meta"]
    monkeypatch.undo()
    # a write that was killed leaves its staging directory inside the destination: the rerun removes it;
    # an empty destination that is a symlink is written through; the files get the umask's modes
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that has ended: the staging directory it left is nobody's
    os.makedirs(tmp_path / "real" / f".llama_jax-partial-{gone.pid}@{socket.gethostname()}-abc123")
    os.symlink(tmp_path / "real", tmp_path / "link")
    convert.to_meta(params, cfg, str(tmp_path / "link"))
    assert "left by a write that did not finish" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "real")) == ["consolidated.00.pth", "params.json"]
    umask = os.umask(0)
    os.umask(umask)
    convert.to_meta(params, cfg, str(tmp_path / "fresh"))
    assert os.stat(tmp_path / "fresh").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "fresh" / "params.json").st_mode & 0o777 == 0o666 & ~umask
    # the staging directory of a write still running (this process's) is not removed: the second write waits
    running = tmp_path / "busy" / f".llama_jax-partial-{os.getpid()}@{socket.gethostname()}-xyz"
    os.makedirs(running)
    with pytest.raises(ConversionError, match=r"busy: another write into it is in progress \(.*, process \d+@"):
        convert.to_meta(params, cfg, str(tmp_path / "busy"))
    assert running.is_dir()


def test_one_ffn_width_said_two_ways_is_the_same_model():
    """An import records the FFN width; a preset gives Meta's formula. Resuming compares the
    width, not the fields that give it."""
    preset = LlamaConfig.llama2_7b()
    as_hf = preset.replace(ffn_hidden_dim=preset.hidden_dim)
    assert ckpt.model_fields_differing(as_hf.to_dict(), preset.to_dict()) == []
    assert ckpt.model_fields_differing(as_hf.replace(ffn_hidden_dim=11000).to_dict(), preset.to_dict()) == [
        "ffn_hidden_dim"]
