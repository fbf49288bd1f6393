"""An interactive Llama 2-Chat session in the terminal (Meta's format, multi-turn,
tokens streamed as they are generated).

    python -m llama_jax.chat --checkpoint=DIR [--system="You are a pirate."]

Type a message and press Enter. `/reset` starts a new dialog, `/exit` (or Ctrl-D) quits;
Ctrl-C during a reply drops that reply, at the prompt it quits. A dialog that would leave
a reply less than --max_new_tokens (or a quarter of the context) drops its oldest
exchanges (the system prompt stays). The context is the length the model trained at
(evaluate.trained_seq_len; an import's, which records none: the model's max_seq_len), or
--context. Sampling defaults are Meta's chat defaults: temperature 0.6, top-p 0.9.
"""

from __future__ import annotations

import argparse
import sys


def reply_length(room: int) -> int:
    """The reply length for `room` tokens of context: a multiple of a quarter of room's
    power of two (of 16 at least; below 16, a power of two): 4 lengths an octave."""
    top = 1 << (room.bit_length() - 1)
    step = max(16, top // 4)
    return room // step * step if room >= 16 else top


def _pow2_length(n: int, cap: int) -> int:
    """A power of two >= n (at least 16), at most `cap`: a dialog's prompts, growing turn by
    turn, share a few compiled decode programs instead of compiling one per turn."""
    b = 16
    while b < n:
        b *= 2
    return max(n, min(b, cap))


def main(argv=None, input_fn=None, out=None) -> int:
    from llama_jax.cli import DefaultsHelp

    ap = argparse.ArgumentParser(prog="python -m llama_jax.chat", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelp)
    ap.add_argument("--checkpoint", required=True, help="a run's workdir or an export / converted checkpoint")
    ap.add_argument("--system", default="", help="system prompt (folded into the first user turn)")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="most tokens of one reply")
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1 = off")
    ap.add_argument("--top_k", type=int, default=0, help="0 = every token")
    ap.add_argument("--seed", type=int, default=0, help="turn i of a dialog samples with seed + i")
    ap.add_argument("--context", type=int, default=None,
                    help="tokens of dialog and reply at most (default: the seq_len the run trained at, which a "
                         "model answers well within; else the model's max_seq_len, the most it takes)")
    from llama_jax.generate import add_dtype_arg, check_sampling_args

    add_dtype_arg(ap)
    args = ap.parse_args(argv)
    from llama_jax.distributed import require_one_process

    require_one_process("python -m llama_jax.chat")
    from llama_jax.checkpoint import quiet_orbax

    quiet_orbax()  # a damaged checkpoint: one error line, not Orbax's and TensorStore's logs
    from llama_jax.tokenizer import DialogError, _turns, valid_unicode

    check_sampling_args(ap, args)
    if args.context is not None and args.context < 2:
        ap.error(f"--context={args.context}: at least 2 tokens")
    system = [{"role": "system", "content": valid_unicode(args.system)}] if args.system else []
    try:  # once, now: a bad system prompt would refuse every message
        _turns(system + [{"role": "user", "content": "x"}], last="user")
    except DialogError as e:
        ap.error(f"--system: {e}")
    out = out or sys.stdout
    piped = input_fn is None and not sys.stdin.isatty()
    if input_fn is None:
        if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach us as surrogates (-> U+FFFD), not
            sys.stdin.reconfigure(errors="surrogateescape")  # as a UnicodeDecodeError in input()
        if not piped:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        input_fn = input
    try:
        return _session(args, system, input_fn, out, piped)
    except KeyboardInterrupt:  # a second Ctrl-C while a reply had not yet stopped
        out.write("\n")
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to show
        from llama_jax.generate import quiet_stdout

        quiet_stdout()
        return 0


def _session(args, system: list[dict], input_fn, out, piped: bool) -> int:
    import time

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.generate import TextStream, generate_interruptibly, load_for_inference
    from llama_jax.tokenizer import DialogError, TokenizerError, first_tag, valid_unicode

    start = time.perf_counter()
    try:
        cfg, params, tok, mesh = load_for_inference(args.checkpoint, args.dtype)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from llama_jax.evaluate import trained_seq_len

    trained = trained_seq_len(args.checkpoint)
    if args.context is not None and args.context > cfg.max_seq_len:
        print(f"error: --context={args.context}: the model's max_seq_len is {cfg.max_seq_len}", file=sys.stderr)
        return 2
    context = min(args.context or trained or cfg.max_seq_len, cfg.max_seq_len)
    why = "" if args.context or context == cfg.max_seq_len else \
        f": the length the run trained at; --context up to the model's {cfg.max_seq_len}"
    print(f"loaded {args.checkpoint} ({cfg.num_params():,} parameters, context {context}{why}) in "
          f"{time.perf_counter() - start:.1f} s; the first reply of each prompt length compiles", file=sys.stderr)
    if system:
        n = len(tok.encode_dialog(system + [{"role": "user", "content": ""}]))
        if n + 1 > context:
            print(f"error: --system is {n} tokens with its format; the context is {context}", file=sys.stderr)
            return 2
    dialog: list[dict] = []
    out.write("llama_jax chat: /reset starts over, /exit quits\n")
    turn = 0
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        if piped:  # a transcript of piped input reads like a session
            out.write(line + "\n")
        text = valid_unicode(line).strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            dialog, turn = [], 0
            out.write("(new dialog)\n")
            continue
        if not text:
            continue
        if text.startswith("/") and text[1:].isalpha():  # a mistyped command is not a message
            out.write(f"(unknown command {text}: /reset starts over, /exit quits)\n")
            continue
        candidate = dialog + [{"role": "user", "content": text}]
        try:
            prompt = tok.encode_dialog(system + candidate)
        except DialogError as e:
            out.write(f"(not sent: {e})\n")
            continue
        dropped = 0  # the oldest exchanges go, so that a reply of max_new_tokens (or a quarter of the context) fits
        while context - len(prompt) < min(args.max_new_tokens, context // 4) and len(candidate) > 1:
            candidate, dropped = candidate[2:], dropped + 1
            prompt = tok.encode_dialog(system + candidate)
        room = context - len(prompt)
        if room < 1:
            out.write(f"(not sent: this message makes a prompt of {len(prompt)} tokens"
                      + (" with the system prompt" if system else "") + f"; the context is {context})\n")
            continue
        if dropped:
            out.write(f"(the {dropped} oldest exchange{'s' * (dropped > 1)} dropped to fit the context of "
                      f"{context} tokens" + ("; the system prompt stays" if system else "") + ")\n")
        # a reply short of room: rounded down to a quarter of its power of two (16 at least), so that the few
        # lengths it takes compile once each and under a quarter of the room is lost
        max_new = args.max_new_tokens if room >= args.max_new_tokens else reply_length(room)
        out.write("assistant> ")
        stream = TextStream(tok, out)
        result = generate_interruptibly(stream, cfg, params, [prompt], max_new, args.temperature, args.top_p,
                                        args.top_k, seed=args.seed + turn, mesh=mesh,
                                        pad_to=_pow2_length(len(prompt), context - max_new))
        if result is None:  # Ctrl-C: the generation stopped at its next step
            out.write("\n(interrupted: the reply is dropped)\n")
            dialog = candidate[:-1]
            continue
        stream.finish()
        out.write("\n")
        new = result.tokens[0]
        if len(new) == max_new and new[-1] != tok.eos_id:
            out.write(f"(the reply was cut at {max_new} tokens: "
                      + ("--max_new_tokens" if max_new == args.max_new_tokens else
                         f"the room the model's context leaves, {room} tokens, rounded down to a multiple of a "
                         "quarter of its power of two, so that replies share compiled programs")
                      + ")\n")
        answer = tok.decode([t for t in new if t != tok.eos_id])
        if not answer.strip():
            out.write("(an empty reply: the model ended it at once)\n")
        hit = first_tag(answer)
        if hit is not None:  # a format tag in the reply would make every later turn an invalid dialog
            out.write(f"(the reply is kept up to its {hit[1]!r}, a tag of the chat format)\n")
            answer = answer[:hit[0]].rstrip()
        dialog = candidate + [{"role": "assistant", "content": answer}]
        turn += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
