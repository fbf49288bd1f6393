"""Batched generation with the explicit KV cache: one jitted prefill of left-padded
prompts, then a decode loop that stays on device (`lax.while_loop`, no Python per token).

    from llama_jax.generate import generate
    out = generate(cfg, params, [[1, 306, 4966], [1, 15043]], max_new_tokens=32,
                   temperature=0.6, top_p=0.9, seed=0)
    out.tokens[i], out.logprobs[i]   # new tokens (up to and including EOS) and their log-probs

Sampling: greedy when temperature == 0; otherwise logits / temperature, then top-k (k > 0)
and top-p (p < 1) filtering, then one inverse-CDF draw a row (`inverse_cdf_sample`).
`logprobs` are the model's own log-probabilities of the chosen tokens (temperature 1,
unfiltered): what rejection sampling's RBoN score uses. (PPO computes its own, at its
rollout temperature, in the forward pass it trains with.)
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import model as llama_model
from llama_jax.distributed import to_host
from llama_jax.model import KVCache, Llama, LlamaConfig, check_attention_kernel
from llama_jax.objectives import argmax
from llama_jax.tokenizer import EOS_ID


class Generation(NamedTuple):
    tokens: list[list[int]]
    logprobs: list[list[float]]


def token_logprob(logits: jax.Array, tok: jax.Array) -> jax.Array:
    """log_softmax(logits)[b, tok[b]] without materialising the [B, V] log-softmax."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = logits - top
    chosen = jnp.take_along_axis(shifted, tok[:, None], axis=1)[:, 0]
    return chosen - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float, top_k: int) -> jax.Array:
    """[B, V] float32 logits -> [B] token ids. `top_k` 0 (or at least V) keeps every token."""
    # below float32's smallest normal number a temperature is 0 on devices that flush subnormals
    if temperature < np.finfo(np.float32).tiny or top_p <= 0.0 or top_k == 1:
        return argmax(logits)
    neg = jnp.finfo(jnp.float32).min
    # shifted to a maximum of 0 before the division: a tiny temperature sends the others to -inf (clamped), not
    # the maximum to +inf, where the softmax would be NaN and the draw token 0
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    logits = jnp.maximum((logits - top) / temperature, neg)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        keep = (cum - probs) < top_p  # the smallest prefix whose mass reaches top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return inverse_cdf_sample(logits, rng)


SAMPLE_BLOCK = 64  # vocabulary entries per block of the two-level inverse-CDF draw


def inverse_cdf_sample(logits: jax.Array, rng: jax.Array, block: int = SAMPLE_BLOCK) -> jax.Array:
    """[B, V] logits -> [B] token ids drawn from softmax(logits) with one uniform number a
    row: the first token whose cumulative probability reaches it, found in two levels
    (which block of `block` tokens, then which token in it), so no pass over [B, V] beyond
    the exponentials and block sums. `jax.random.categorical` draws V Gumbel numbers a row
    instead: at the toy recipe's batch 2,048 its random bits and logarithms were a quarter of
    a decode step on XLA:CPU. A token of zero probability (masked by top-k / top-p) is never
    drawn: the draw is clamped into the mass of the chosen block."""
    B, V = logits.shape
    nb = -(-V // block)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    e = jnp.pad(e, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    mass = jnp.sum(e, axis=-1)  # [B, nb]
    cum = jnp.cumsum(mass, axis=-1)
    u = (1.0 - jax.random.uniform(rng, (B,), jnp.float32)) * cum[:, -1]  # in (0, total]
    b = jnp.minimum(jnp.sum(cum < u[:, None], axis=-1), nb - 1)  # first block whose cumulative mass reaches u
    within = jnp.take_along_axis(e, b[:, None, None], axis=1)[:, 0]  # [B, block]
    wcum = jnp.cumsum(within, axis=-1)
    before = jnp.take_along_axis(cum - mass, b[:, None], axis=1)[:, 0]
    own = jnp.take_along_axis(mass, b[:, None], axis=1)[:, 0]
    # u's place in the block, on the block's own cumulative scale (rounding can put u - before
    # just outside (0, own]); the clamp keeps it on a token of positive mass
    r = (u - before) / own * wcum[:, -1]
    r = jnp.clip(r, jnp.finfo(jnp.float32).tiny, wcum[:, -1])
    i = jnp.minimum(jnp.sum(wcum < r[:, None], axis=-1), block - 1)
    return (b * block + i).astype(jnp.int32)


# XLA:CPU's default copy insertion copies every buffer of the decode loop's carry (the
# whole KV cache) on every step; its region analysis proves those copies unnecessary
# (measured: batch 16, 292 -> 402 tokens/s). Other backends ignore this option.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p", "top_k", "eos_id",
                                             "stream"), compiler_options=DECODE_COMPILER_OPTIONS)
def _generate(params, tokens, segment_ids, rng, *, config: LlamaConfig, max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, eos_id: int, stream: bool = False):
    model = Llama(config)
    B, P = tokens.shape
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    if llama_model.use_layerwise_decode(config):  # per-layer weights and cache buffers, made once (see LlamaConfig)
        layers = llama_model.unstack_layers(params)
        cache = llama_model.layerwise_cache(config, B, P + max_new_tokens)

        def forward(tok, pos, seg, cache, last_only=False):
            return llama_model.apply_layerwise(config, params, layers, tok, pos, seg, cache, last_only=last_only)
    else:
        cache = KVCache.init(config, B, P + max_new_tokens)

        def forward(tok, pos, seg, cache, last_only=False):  # every position's logits; the caller keeps the last
            return model.apply({"params": params}, tok, pos, seg, cache=cache)

    logits, cache = forward(tokens, positions, segment_ids, cache, last_only=True)
    last = logits[:, -1]
    next_pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, last, pos, out, out_lp, done, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_logits(last, key, temperature, top_p, top_k)
        lp = token_logprob(last, tok)
        tok = jnp.where(done, 0, tok)
        out = out.at[:, i].set(tok)
        out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp))
        if stream:  # streaming: hand each step's tokens to the host as they exist; it may answer "stop"
            done = done | io_callback(_forward_tokens, jax.ShapeDtypeStruct((), jnp.bool_), tok, done, ordered=True)
        done = done | (tok == eos_id)
        logits, cache = forward(tok[:, None], pos[:, None], jnp.ones((B, 1), jnp.int32), cache)
        return i + 1, cache, logits[:, -1], pos + 1, out, out_lp, done, rng

    init = (jnp.zeros((), jnp.int32), cache, last, next_pos, jnp.zeros((B, max_new_tokens), jnp.int32),
            jnp.zeros((B, max_new_tokens), jnp.float32), jnp.zeros((B,), bool), rng)
    n, _, _, _, out, out_lp, _, _ = jax.lax.while_loop(cond, body, init)
    return out, out_lp, n


# The host callback of the current streaming call. The compiled program calls this fixed
# function, so a new callback (every chat turn) does not recompile the decode loop.
_STREAM_TARGET: list[Callable] = []
_STREAM_LOCK = threading.Lock()


_STREAM_ERROR: list[BaseException] = []  # what the current streaming callback raised, re-raised by generate


def _forward_tokens(tokens, done) -> np.ndarray:
    if not _STREAM_TARGET or _STREAM_ERROR:
        return np.bool_(bool(_STREAM_ERROR))
    try:
        stop = _STREAM_TARGET[-1](tokens, done)
        if stop is not None and not isinstance(stop, (bool, np.bool_)):
            raise TypeError(f"generate: on_token must return True (stop every row), False or None; got {stop!r}")
    except Exception as e:  # noqa: BLE001 - raised again by generate as it is (not as XLA's runtime error)
        _STREAM_ERROR.append(e)
        return np.bool_(True)
    return np.bool_(bool(stop))


def _bucket(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def token_rows(rows, vocab_size: int, what: str, allow_empty: bool = False) -> list[list[int]]:
    """`rows` (a list, tuple, 2-D array or iterable of token-id sequences) as lists of
    ints, each id in [0, vocab_size); a ValueError naming `what` and the row for anything
    else: text instead of ids, a flat list of ids, floats, an empty row (unless
    `allow_empty`), an id outside the vocabulary (the embedding would give NaN, or another
    token's vector, silently)."""
    if isinstance(rows, (str, bytes)):
        raise ValueError(f"{what}s: give token ids (Tokenizer.encode), not text")
    if hasattr(rows, "__array__") and not isinstance(rows, np.ndarray):  # a jax array: as numpy
        rows = np.asarray(rows)
    rows = list(rows) if not isinstance(rows, np.ndarray) else [list(r) for r in np.atleast_2d(rows)]
    if not rows:
        raise ValueError(f"{what}s: none given")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (int, np.integer)):
            raise ValueError(f"{what}s: a flat list of ids; give one list of ids per row ([ids] for one)")
        if isinstance(row, (str, bytes)):
            raise ValueError(f"{what} {i}: text {row[:30]!r}; give token ids (Tokenizer.encode)")
        row = list(np.asarray(row)) if hasattr(row, "__array__") else list(row)  # a jax or numpy row
        bad = next((t for t in row if not isinstance(t, (int, np.integer)) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"{what} {i}: {bad!r} is not a token id (an int)")
        if not row and not allow_empty:
            raise ValueError(f"{what} {i}: needs at least one token")
        off = next((t for t in row if not 0 <= t < vocab_size), None)
        if off is not None:
            raise ValueError(f"{what} {i} has token id {off}, outside the model's vocabulary [0, {vocab_size})")
        out.append([int(t) for t in row])
    return out


def check_params(params, what: str) -> None:
    """A ValueError for params given in Flax's {"params": ...} wrapper (the model wants the
    inner tree: `variables["params"]`)."""
    if isinstance(params, dict) and "params" in params and "layers" not in params:
        raise ValueError(f"{what}: params is a {{'params': ...}} variables dict; pass its ['params']")


def generate(config: LlamaConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_id: int = EOS_ID, on_token: Callable | None = None, mesh=None, rules=None,
             pad_to: int = 0) -> Generation:
    """New tokens for each prompt (stopping after EOS) and their log-probabilities.

    `on_token(tokens [B], done [B])` is called on the host after every decode step
    (streaming); when it returns True, every row stops there (False or None: go on;
    anything else, or an exception it raises, ends the call with that error). With `mesh` and `rules`,
    activations are sharded like training's (params should already be on that mesh, e.g.
    from `checkpoint.load_model(..., shardings=)`).
    Prompts are left-padded to a multiple of 16 tokens, or to `pad_to` when longer (within
    what the context leaves): each padded length compiles its own decode program, so a
    caller whose prompt grows call by call (a chat) passes a few fixed lengths."""
    check_params(params, "generate")
    if isinstance(params, dict):  # the LM alone: a policy with a value head (PPO's) shares the LM's programs
        params = {k: v for k, v in params.items() if k not in ("value_head", "score_head")}
    prompts = token_rows(prompts, config.vocab_size, "generate: prompt")
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= temperature < float("inf") or not 0 <= top_p <= 1 or top_k < 0:  # NaN fails the first two
        raise ValueError(f"generate: temperature must be finite and >= 0 (0 = greedy), top_p in [0, 1] and top_k "
                         f">= 0 (0 = every token); got {temperature}, {top_p} and {top_k}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(f"generate: the prompt ({longest} tokens) + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_seq_len {config.max_seq_len}")
    # bucketed, so similar lengths share a compile (never past what the context leaves)
    P = min(max(_bucket(longest), int(pad_to)), config.max_seq_len - max_new_tokens)
    tokens = np.zeros((len(prompts), P), np.int32)
    seg = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the same slot
        tokens[i, P - len(p):] = p
        seg[i, P - len(p):] = 1
    kwargs = dict(config=config, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                  top_p=float(top_p), top_k=int(top_k), eos_id=int(eos_id), stream=on_token is not None)
    inputs = (jnp.asarray(tokens), jnp.asarray(seg))
    if jax.process_count() > 1:  # every process passes the same prompts, as one replicated global array
        params_mesh = mesh if mesh is not None else jax.tree_util.tree_leaves(params)[0].sharding.mesh
        inputs = tuple(jax.device_put(x, NamedSharding(params_mesh, PartitionSpec())) for x in (tokens, seg))
    if on_token is not None:  # one streaming call at a time: the compiled callback calls the latest target
        _STREAM_LOCK.acquire()
        _STREAM_TARGET.append(on_token)
        _STREAM_ERROR.clear()
    try:
        if mesh is not None:
            from llama_jax import sharding

            with sharding.activate(mesh, rules or sharding.DEFAULT_RULES):
                out, lp, n = _generate(params, *inputs, jax.random.key(seed), **kwargs)
        else:
            out, lp, n = _generate(params, *inputs, jax.random.key(seed), **kwargs)
        n = int(to_host(n))  # waits for the loop (and its callbacks) to finish
        out, lp = to_host(out)[:, :n], to_host(lp)[:, :n]  # steps not taken (on_token said stop) are no tokens
    finally:
        if on_token is not None:
            _STREAM_TARGET.pop()
            raised = list(_STREAM_ERROR)
            _STREAM_ERROR.clear()
            _STREAM_LOCK.release()
    if on_token is not None and raised:  # the callback's own error, after the loop stopped at that step
        raise raised[0]
    result_tokens, result_lp = [], []
    for row, row_lp in zip(out, lp):
        hits = np.nonzero(row == eos_id)[0]
        n = int(hits[0]) + 1 if len(hits) else len(row)
        result_tokens.append(row[:n].tolist())
        result_lp.append(row_lp[:n].tolist())
    return Generation(result_tokens, result_lp)


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def add_dtype_arg(ap) -> None:
    """The inference CLIs' `--dtype`: weights and matmuls in another dtype than stored."""
    from llama_jax.model import DTYPES

    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="weights and matmuls in this dtype (cast while reading; bfloat16 halves a float32 "
                    "checkpoint's memory); default: the checkpoint's own")


def load_on_local_devices(checkpoint: str, step: int | None = None, need: str = "lm", dtype: str | None = None):
    """(config, params split over all local devices (fsdp), heads, tokenizer, mesh) of a
    run or export, which must have the `need` head: a model too big for one device loads.
    `dtype`: parameters (cast as they are read) and compute in it, not in the stored dtypes."""
    from llama_jax import checkpoint as ckpt
    from llama_jax import sharding
    from llama_jax.tokenizer import Tokenizer

    step, meta = ckpt.read_meta(checkpoint, step)
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    cfg, heads = ckpt.model_config(meta, **overrides), tuple(meta.get("heads", ["lm"]))
    if need not in heads:
        hint = " (a DPO policy is scored against its reference: evaluate --reference=ITS_INIT_FROM)" \
            if need == "score" and "lm" in heads and meta.get("stage") == "dpo" else ""
        raise ckpt.CheckpointError(f"{checkpoint}: needs a '{need}' head; it has {list(heads)}{hint}")
    try:
        check_attention_kernel(cfg)
    except ValueError as e:  # trained with a kernel this machine has not (cudnn on a GPU): the same numbers
        print(f"note: {e}; this checkpoint's attention={cfg.attention!r} runs as 'auto' here", file=sys.stderr)
        overrides["attention"] = "auto"
        cfg = cfg.replace(attention="auto")
    mesh = sharding.make_mesh(1, -1, 1)
    sharding.check_model_fits_mesh(cfg, mesh)
    model = Llama(cfg, heads)  # a PPO policy also holds its value head
    shardings = sharding.param_shardings_like(sharding.abstract_params(model), model, mesh, sharding.DEFAULT_RULES)
    cfg, params, heads, tok_path = ckpt.load_model(checkpoint, step, shardings=shardings, **overrides)
    return cfg, params, heads, Tokenizer.of_checkpoint(checkpoint, tok_path, cfg.vocab_size), mesh


def load_for_inference(checkpoint: str, dtype: str | None = None):
    """(config, params on a mesh over all local devices, tokenizer, mesh) of a run or export."""
    cfg, params, _, tok, mesh = load_on_local_devices(checkpoint, dtype=dtype)
    params = {k: v for k, v in params.items() if not k.endswith("_head")}  # the LM's own: what generate runs
    return cfg, params, tok, mesh


class TextStream:
    """Prints the text of row 0 as tokens arrive. The answer is decoded whole each time
    and trailing incomplete UTF-8 (byte-fallback pieces of one character) is held back
    until it completes, so what is printed always equals the final decoded text.
    `prefix`: token ids already shown (a continued prompt), decoded with the new tokens so
    that the space SentencePiece drops at the start of a text is kept between them."""

    def __init__(self, tokenizer, out=None, prefix=()):
        self.tok, self.out, self.ids, self.prefix = tokenizer, out or sys.stdout, [], list(prefix)
        self.closed = False  # the reader went away
        self.stop = False  # set to end the generation at its next step (Ctrl-C)
        self.start = self.shown = tokenizer.decode(self.prefix) if self.prefix else ""

    def _text(self) -> str:
        return self.tok.decode(self.prefix + self.ids)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            new, self.shown = text[len(self.shown):], text
            if self.closed:
                return
            try:
                self.out.write(new)
                self.out.flush()
            except BrokenPipeError:  # the reader went away (`| head`); raised here, it would end the decode
                # loop's host callback with a runtime error: the caller finds out at its next write
                self.closed = True

    def __call__(self, tokens, done) -> bool:
        """Shows row 0's new token; True (stop generating) once nobody reads or Ctrl-C was hit."""
        if not (bool(done[0]) or int(tokens[0]) == self.tok.eos_id):
            self.ids.append(int(tokens[0]))
            self._show(self._text().rstrip("\ufffd"))
        return self.closed or self.stop

    def finish(self) -> str:
        """Prints what was held back; returns the whole text after the prefix."""
        text = self._text()
        self._show(text)
        return text[len(self.start):] if text.startswith(self.start) else self.tok.decode(self.ids)


def generate_interruptibly(stream: TextStream, *args, **kwargs) -> Generation | None:
    """`generate(*args, on_token=stream, **kwargs)`, or None when Ctrl-C came first. The
    decode loop runs in a worker thread while this (the main) thread waits in short, signal-
    interruptible slices: Ctrl-C sets `stream.stop`, which the loop's next step reads, so the
    generation ends within a step instead of after its last token; a second Ctrl-C raises
    KeyboardInterrupt."""
    box: dict = {}

    def work():
        try:
            box["result"] = generate(*args, on_token=stream, **kwargs)
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            worker.join(0.1)
        except KeyboardInterrupt:
            if stream.stop:  # a second Ctrl-C: the loop has not reached a step (compiling, or stuck)
                raise
            stream.stop = True
    if "error" in box:
        raise box["error"]
    return None if stream.stop else box["result"]


def quiet_stdout() -> None:
    """After a BrokenPipeError (the reader went away, as with `| head`): sends what is still
    to be written, the interpreter's last flush included, nowhere."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def check_sampling_args(ap, args) -> None:
    """The sampling flags the generate and chat command lines share: a usage error for
    values `generate` cannot sample with."""
    if args.max_new_tokens < 1:
        ap.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf") or not 0 <= args.top_p <= 1:  # NaN fails both
        ap.error(f"--temperature must be >= 0 (0 = greedy) and --top_p in [0, 1], got {args.temperature} and "
                 f"{args.top_p}")
    if getattr(args, "top_k", 0) < 0:
        ap.error(f"--top_k must be >= 0 (0 = every token), got {args.top_k}")


def _encode_prompt(tok, prompt, chat: bool, system: str | None = None) -> list[int]:
    """A CLI prompt's tokens: a dialog (a list of messages ending with a user turn) or with
    `chat` a user turn, in the Llama 2-Chat format after the `system` prompt, if any (a
    dialog's own system message wins); else BOS + the text."""
    if isinstance(prompt, list):
        own = bool(prompt) and isinstance(prompt[0], dict) and prompt[0].get("role") == "system"
        return tok.encode_dialog(([] if own or not system else [{"role": "system", "content": system}]) + prompt)
    if chat:
        return tok.encode_dialog(([{"role": "system", "content": system}] if system else [])
                                 + [{"role": "user", "content": prompt}])
    if system:
        raise ValueError("--system is for chat prompts: this one is plain text (add --chat)")
    return tok.encode(prompt, bos=True)


def read_prompts(path: str) -> list[tuple[str, str | list, dict]]:
    """(where, prompt, other fields) of each prompt in `path`: one a line, a JSON object's
    "prompt" field (its other fields are kept, e.g. an id), its "messages" (a dialog ending
    with a user turn: the prompt is the list, kept in the other fields too) or the line
    itself ('\\n' written for a newline); blank lines are skipped."""
    import json

    from llama_jax.tokenizer import valid_unicode

    out = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: a byte-order mark is no text
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: a line starting with '{{' is read as JSON: {e}") from None
                if isinstance(record.get("messages"), list) and "prompt" not in record:
                    messages = record["messages"]
                    if isinstance(record.get("system"), str) and not (messages and isinstance(messages[0], dict) and
                                                                      messages[0].get("role") == "system"):
                        messages = [{"role": "system", "content": record["system"]}] + messages  # a top-level one
                    out.append((where, _valid_messages(messages, where), record))
                    continue
                if not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{where}: needs a string field \"prompt\" (or \"messages\": a dialog ending "
                                     "with a user turn)")
                text = record.pop("prompt")
            else:
                text, record = line.replace("\\n", "\n"), {}
            out.append((where, valid_unicode(text), record))
    if not out:
        raise ValueError(f"{path}: no prompts (every line is blank)")
    return out


def completion_text(tok, prompt: list[int], new: list[int], chat: bool) -> str:
    """The text of `new` (EOS left out) as it continues `prompt`: decoded together with the
    prompt and cut after it, so that a space SentencePiece drops at the start of a text is
    kept ("the quick" + " brown", not "brown"); a chat answer's own leading space is not."""
    new = [t for t in new if t != tok.eos_id]
    if chat:
        return tok.decode(new)
    head, whole = tok.decode(prompt), tok.decode(prompt + new)
    return whole[len(head):] if whole.startswith(head) else tok.decode(new)


def _valid_messages(messages: list, where: str) -> list[dict]:
    """A prompt file's dialog, checked as the RLHF prompt files are (a DataError naming the
    line), its text made valid Unicode."""
    from llama_jax.data.chat import validate_messages
    from llama_jax.tokenizer import valid_unicode

    validate_messages({"messages": messages}, where, last="user")
    return [{**m, "content": valid_unicode(m["content"])} for m in messages]


def _generate_file(args) -> int:
    """`generate --prompt_file`: batches of prompts, one JSON line each to stdout."""
    import json
    import time

    from llama_jax import metrics
    from llama_jax.tokenizer import DialogError

    prompts = read_prompts(args.prompt_file)
    plain = next((where for where, text, _ in prompts if isinstance(text, str)), None)
    if args.system and not args.chat and plain:  # before the model is loaded
        raise ValueError(f"{plain}: a plain-text prompt, which --system does not apply to (add --chat, or write "
                         "the prompts as dialogs)")
    start = time.perf_counter()
    cfg, params, tok, mesh = load_for_inference(args.checkpoint, args.dtype)
    print(f"loaded {args.checkpoint} ({cfg.num_params():,} parameters) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    encoded = []
    for where, text, _ in prompts:
        try:
            ids = _encode_prompt(tok, text, args.chat, args.system)
        except DialogError as e:  # a tag of the chat format in the prompt
            raise ValueError(f"{where}: {e}") from None
        if len(ids) >= cfg.max_seq_len:
            raise ValueError(f"{where}: the prompt has {len(ids)} tokens and the model's context is "
                             f"{cfg.max_seq_len}: no room is left to generate")
        encoded.append(ids)
    past_trained(args.checkpoint, min(max(map(len, encoded)) + args.max_new_tokens, cfg.max_seq_len),
                 cfg.max_seq_len)
    progress = metrics.Progress(len(prompts), what="prompts", throttle=True)
    cut: list[str] = []  # rows stopped by the room their batch's longest prompt left, before max_new_tokens
    full: list[str] = []  # rows stopped by the model's context: their own prompt left less than max_new_tokens
    total, start = 0, time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        batch = encoded[first:first + args.batch_size]
        max_new = min(args.max_new_tokens, cfg.max_seq_len - max(len(p) for p in batch))
        result = generate(cfg, params, batch, max_new, args.temperature, args.top_p, args.top_k,
                          args.seed + first, mesh=mesh)
        for (where, text, extra), ids, new in zip(prompts[first:first + args.batch_size], batch, result.tokens):
            finished = bool(new) and new[-1] == tok.eos_id
            stopped = "eos" if finished else "max_new_tokens" if len(new) >= args.max_new_tokens else \
                "context" if len(ids) + len(new) >= cfg.max_seq_len else "batch"
            if stopped in ("context", "batch"):
                (full if stopped == "context" else cut).append(where)
            total += len(new)
            sys.stdout.write(json.dumps({**extra, **({} if isinstance(text, list) else {"prompt": text}),
                                         "completion": completion_text(tok, ids, new,
                                                                       args.chat or isinstance(text, list)),
                                         "new_tokens": len(new), "finished": finished, "stopped": stopped},
                                        ensure_ascii=False) + "\n")
        sys.stdout.flush()
        progress.update(min(first + args.batch_size, len(prompts)))
    progress.close()
    seconds = time.perf_counter() - start
    print(f"[{len(prompts)} prompts, {total} tokens in {seconds:.2f} s, compilation included: "
          f"{total / seconds:.1f} tokens/s]", file=sys.stderr)
    if full:
        print(f"note: {len(full)} prompt(s) generated fewer than --max_new_tokens {args.max_new_tokens} (\"stopped\": "
              f"\"context\"; first: {full[0]}): they reached the model's context of {cfg.max_seq_len} tokens",
              file=sys.stderr)
    if cut:
        print(f"note: {len(cut)} prompt(s) generated fewer than --max_new_tokens {args.max_new_tokens} (\"stopped\": "
              f"\"batch\"; first: {cut[0]}): their batch's longest prompt left less of the model's context of "
              f"{cfg.max_seq_len} (a smaller --batch_size, or prompts of similar lengths together, leaves more)",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    import argparse
    import time

    from llama_jax.cli import DefaultsHelp

    ap = argparse.ArgumentParser(prog="python -m llama_jax.generate", description="Continue a prompt (streamed to "
                                 "stdout; timing on stderr).", formatter_class=DefaultsHelp)
    ap.add_argument("--checkpoint", required=True, help="a run's workdir or an export / converted checkpoint")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue (with --chat: the user's message)")
    source.add_argument("--prompt_file", help="many prompts, one a line (plain text, or JSONL with a \"prompt\" "
                        "field, or \"messages\": a dialog ending with a user turn; '\\n' in plain text is a "
                        "newline), generated --batch_size at a time; one JSON line "
                        "per prompt to stdout: its other JSON fields, prompt, completion, new_tokens, finished "
                        "(ended with EOS), stopped (eos; max_new_tokens; context: the model's context is full; batch: "
                        "the batch's longest prompt left less room)")
    ap.add_argument("--batch_size", type=int, default=16, help="prompts per batch with --prompt_file")
    ap.add_argument("--max_new_tokens", type=int, default=128,
                    help="most new tokens (fewer when the context has less room: said on stderr)")
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (the Python API's default)")
    ap.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1 = off")
    ap.add_argument("--top_k", type=int, default=0, help="0 = every token")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (batch i of --prompt_file: seed + i x batch)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a Llama 2-Chat user turn")
    ap.add_argument("--system", help="with --chat, or for a --prompt_file's dialogs: a system prompt before the "
                    "user's turn (a dialog's own system message wins)")
    add_dtype_arg(ap)
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.generate")
    from llama_jax.checkpoint import quiet_orbax

    quiet_orbax()  # a damaged checkpoint: one error line, not Orbax's and TensorStore's logs
    check_sampling_args(ap, args)
    if args.system is not None and not args.chat and not args.prompt_file:
        ap.error("--system is a Llama 2-Chat system prompt: it needs --chat (or a --prompt_file of dialogs)")
    if args.batch_size < 1:
        ap.error(f"--batch_size must be at least 1, got {args.batch_size}")
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.tokenizer import DialogError, TokenizerError, valid_unicode

    if args.prompt_file:
        try:
            return _generate_file(args)
        except BrokenPipeError:  # before OSError, of which it is one: the reader went away (`| head`)
            quiet_stdout()
            return 0
        except KeyboardInterrupt:  # what is written is whole lines, each a finished prompt
            print("\n(interrupted)", file=sys.stderr)
            return 130
        except (CheckpointError, TokenizerError, DialogError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    text = valid_unicode(args.prompt)
    try:
        start = time.perf_counter()
        cfg, params, tok, mesh = load_for_inference(args.checkpoint, args.dtype)
        print(f"loaded {args.checkpoint} ({cfg.num_params():,} parameters) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        prompt = _encode_prompt(tok, text, args.chat, args.system)
        max_new = min(args.max_new_tokens, cfg.max_seq_len - len(prompt))
        if max_new < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens and the model's context is {cfg.max_seq_len}: "
                             "no room is left to generate")
        if max_new < args.max_new_tokens:
            print(f"note: --max_new_tokens {args.max_new_tokens} -> {max_new}: the prompt's {len(prompt)} tokens "
                  f"leave {max_new} of the model's context of {cfg.max_seq_len}", file=sys.stderr)
        past_trained(args.checkpoint, len(prompt) + max_new, cfg.max_seq_len)
        if not args.chat:
            sys.stdout.write(text)
        stream = TextStream(tok, prefix=() if args.chat else prompt)
        start = time.perf_counter()
        result = generate_interruptibly(stream, cfg, params, [prompt], max_new, args.temperature, args.top_p,
                                        args.top_k, args.seed, mesh=mesh)
        seconds = time.perf_counter() - start
        stream.finish()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if result is None:
            print("(interrupted)", file=sys.stderr)
            return 130
        n = len(result.tokens[0])
        print(f"[{n} tokens in {seconds:.2f} s, compilation included: {n / seconds:.1f} tokens/s]", file=sys.stderr)
    except (CheckpointError, TokenizerError, DialogError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to show
        quiet_stdout()
    return 0


def past_trained(checkpoint: str, longest: int, context: int) -> None:
    """A note when prompt and answer (`longest` tokens) may run past the seq_len the run
    trained at (a model's answers there are unreliable), though within its context."""
    from llama_jax.evaluate import trained_seq_len

    trained = trained_seq_len(checkpoint)
    if trained is not None and trained < longest <= context:
        print(f"note: prompt and answer may reach {longest} tokens, past the {trained} that {checkpoint} trained "
              "at: answers there may fall apart", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
