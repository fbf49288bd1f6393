"""An interactive Llama 2-Chat session in the terminal (Meta's format, multi-turn,
tokens streamed as they are generated).

    python -m llama_jax.chat --checkpoint=DIR [--system="You are a pirate."]

Type a message and press Enter. `/reset` starts a new dialog, `/exit` (or Ctrl-D) quits.
Sampling defaults are Meta's chat defaults: temperature 0.6, top-p 0.9.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None, input_fn=input, out=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama_jax.chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--system", default="", help="system prompt (folded into the first user turn)")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from llama_jax.generate import TextStream, check_sampling_args, generate, load_for_inference

    check_sampling_args(ap, args)
    out = out or sys.stdout

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.tokenizer import DialogError, TokenizerError, first_tag

    try:
        cfg, params, tok, mesh = load_for_inference(args.checkpoint)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    dialog: list[dict] = []
    out.write("llama_jax chat: /reset starts over, /exit quits\n")
    turn = 0
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            dialog = []
            out.write("(new dialog)\n")
            continue
        if not text:
            continue
        candidate = dialog + [{"role": "user", "content": text}]
        try:
            prompt = tok.encode_dialog(system + candidate)
        except DialogError as e:
            out.write(f"(not sent: {e})\n")
            continue
        room = cfg.max_seq_len - len(prompt)
        if room < 1:
            out.write("(the dialog is longer than the model's context; /reset to start over)\n")
            continue
        out.write("assistant> ")
        stream = TextStream(tok, out)
        result = generate(cfg, params, [prompt], min(args.max_new_tokens, room), args.temperature, args.top_p,
                          seed=args.seed + turn, on_token=stream, mesh=mesh)
        stream.finish()
        out.write("\n")
        answer = tok.decode([t for t in result.tokens[0] if t != tok.eos_id])
        hit = first_tag(answer)
        if hit is not None:  # a format tag in the reply would make every later turn an invalid dialog
            out.write(f"(the reply is kept up to its {hit[1]!r}, a tag of the chat format)\n")
            answer = answer[:hit[0]].rstrip()
        dialog = candidate + [{"role": "assistant", "content": answer}]
        turn += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
