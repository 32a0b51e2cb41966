"""`murmur chat RUN_OR_MODEL_DIR`: talk to a model in the terminal, replies streamed as they come.

Commands: /reset starts over, /system TEXT sets the system prompt (and starts over), /quit leaves.
Ctrl-C during a reply stops the reply; Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /quit"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="RUN_OR_MODEL_DIR", help="a Murmur run folder or checkpoint, or a Hugging Face "
                   "model directory with its tokenizer")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument("--seed", type=int, default=None, help="fix the sampling for reproducible replies")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def chat_loop(engine, params, read: Callable[[str], str], write: Callable[[str], None], system: str = "") -> int:
    """Run the conversation until /quit or end of input; returns the number of replies given."""
    messages: list[dict[str, str]] = []
    replies = 0
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return replies
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return replies
        if text == "/reset":
            messages = []
            write("(new conversation)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip()
            messages = []
            write(f"(system prompt {'set' if system else 'cleared'}; new conversation)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": text})
        prompt = ([{"role": "system", "content": system}] if system else []) + messages
        reply = []
        ids, _ = engine.encode_prompt(prompt)
        room = engine.max_seq_len - len(ids)
        if room < 1:
            messages.pop()
            write("(the conversation no longer fits in the model's context; /reset to start over)\n")
            continue
        stream = engine.stream(prompt, replace(params, max_tokens=min(params.max_tokens or room, room)))
        try:
            for out in stream:
                if out.text:
                    reply.append(out.text)
                    write(out.text)
                if out.finished and out.error:
                    write(f"\n(error: {out.error})")
        except KeyboardInterrupt:
            stream.close()  # aborts the request in the engine
            write(" (stopped)")
        write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        replies += 1


def run(args: argparse.Namespace) -> int:
    from murmur.accel import resolve_device
    from murmur.errors import MurmurError
    from murmur.infer.engine import Engine
    from murmur.infer.sampling import SamplingParams

    device = resolve_device(args.device)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                seed=args.seed)
    except MurmurError as err:
        raise MurmurError(f"bad sampling option: {err}") from None
    engine = Engine.from_source(args.src, device=device, max_batch_size=1)  # bf16 on CUDA, float32 on CPU
    # The context may be shorter than the model's when its KV cache had to fit the memory free now.
    print(f"chatting with {args.src} on {device} ({engine.max_seq_len:,}-token context); {HELP}", file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        chat_loop(engine, params, input, write, system=args.system)
    except KeyboardInterrupt:
        write("\n")
    return 0
