"""The decoding and loading options, declared once.

`DecodeOptions` says how a model decodes: plain, lossless speculative decoding, or SpecEE's early
exit, with their drafters, draft lengths, exit rule, thresholds and exit schedule. `ModelOptions`
says how it is loaded (context, threads, offload). Each field carries its command-line flag and
help; every value is checked in `check()`, which the constructors run. `add_arguments()` makes a
parser's flags from the fields and `from_args()` reads them back, so `run`, `serve`, `bench`,
`eval` and `calibrate` cannot disagree with `Llama` (a test checks every subcommand's parser).

A Python value that a flag cannot spell (a PredictorFile, a Drafter object) passes through.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

KV_POLICIES = ("exact", "mask")
EXIT_RULES = ("verify", "candidates")
CHAIN_DRAFTERS = ("auto", "head+lookup", "head", "lookup")  # by name; a draft model by its .gguf path
EXIT_DRAFTERS = ("auto", "head+lookup", "head", "ngram")    # likewise
MAX_DRAFT = 16


def layer_list(text: str) -> List[int]:
    """Comma-separated layer numbers or offsets; "none": no layers."""
    try:
        return [] if text == "none" else [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def option(default, flag: str, help: str, *, short: Optional[str] = None, choices: Optional[Sequence[str]] = None,
           type=None, metavar: Optional[str] = None, default_text: Optional[str] = None,
           sweep: Optional[str] = None):
    """A dataclass field with its command-line flag. default_text: what the default means in help
    when it is None; sweep: the flag of `bench`, which takes a comma-separated list of values."""
    return field(default=default, metadata=dict(
        flag=flag, short=short, help=help, choices=choices, type=type, metavar=metavar,
        default_text=default_text, sweep=sweep))


def _is_model_path(value) -> bool:
    return isinstance(value, str) and value.endswith(".gguf")


@dataclass(frozen=True)
class DecodeOptions:
    """How a specee_pc.Llama decodes. The mode follows from the fields: `speculate` set (not
    "none"): lossless speculative decoding; else `predictor` or `force_exit_layers` set: early
    exit; else plain decoding (llama-cpp-python's)."""

    speculate: Optional[str] = option(
        None, "--speculate", choices=CHAIN_DRAFTERS + ("none",), sweep="--speculate",
        help="speculative decoding (lossless) with this chain drafter: the predictor file's EAGLE draft head, "
             "prompt lookup, or both (each round verifies the chain that promises more); auto: head+lookup when "
             "the predictor file has a head and these costs let it pay, else lookup; none: off",
        default_text="none")
    draft: Optional[str] = option(
        None, "--draft", metavar="DRAFT.gguf",
        help="draft model sharing the target's vocabulary: it drafts the speculation chains (with early exit: "
             "its top-k are the exit candidates)", default_text="none")
    draft_max: int = option(4, "--draft-max", type=int, metavar="N",
                            help=f"the longest chain a speculation round verifies, 1..{MAX_DRAFT}")
    draft_length: Optional[int] = option(
        None, "--draft-length", type=int, metavar="N",
        help="verify exactly N drafts whenever there are as many, 1..--draft-max",
        default_text="chosen each round from measured batch costs and tracked acceptance")
    predictor: Any = option(
        None, "--predictor", metavar="FILE.gguf", sweep="--predictor",
        help="predictor file made for this model, with the exit predictors and the draft head; auto: the one "
             "shipped with specee-pc for the model", default_text="none; with speculation: auto")
    drafter: Any = option(
        "auto", "--drafter", choices=EXIT_DRAFTERS,
        help="early exit's candidates: the predictor file's draft head, the head merged with prompt lookup "
             "(head+lookup), or prompt lookup (ngram); auto: the ones the file's predictors were trained on")
    exit_rule: str = option(
        "verify", "--exit-rule", choices=EXIT_RULES, sweep="--rules",
        help="verify: full LM head at the exit, exit only if its argmax is a candidate (SpecEE); candidates: "
             "emit the best candidate without the full LM head (under --kv-policy mask it ruins output)")
    exit_threshold: Optional[float] = option(
        None, "--threshold", type=float, metavar="T", sweep="--thresholds",
        help="predictor score in (0, 1] above which a step may exit", default_text="the predictor file's")
    exit_threshold_unmatched: Optional[float] = option(
        None, "--threshold-unmatched", type=float, metavar="T", sweep="--thresholds-unmatched",
        help="the score in (0, 1] an exit needs when its token is not a prompt-lookup match in the context "
             "(those exits are wrong more often; 1.0 exits on matches only)", default_text="--threshold")
    kv_policy: str = option(
        "exact", "--kv-policy", choices=KV_POLICIES, sweep="--policies",
        help="exact: re-run an exited token in full with its exit token, whose logits verify it: outputs are "
             "the full model's; mask (SpecEE, LOSSY, no repair cost): emit the exit token and hide the position "
             "from the layers it skipped")
    offline_layers: Optional[Tuple[int, ...]] = option(
        None, "--offline-layers", type=layer_list, metavar="L1,L2",
        help="layers every step checks for an exit", default_text="the predictor file's")
    online_offsets: Optional[Tuple[int, ...]] = option(
        None, "--online-offsets", type=layer_list, metavar="O1,O2",
        help="offsets around the last exits' layers also checked", default_text="the predictor file's")
    force_exit_layers: Tuple[int, ...] = option(
        (), "--force-exit-layers", type=layer_list, metavar="L1,L2",
        help="debug: exit at the first of these layers each step reaches")

    def __post_init__(self):
        for name in ("offline_layers", "online_offsets", "force_exit_layers"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self.check()

    @property
    def mode(self) -> str:
        """"speculate", "exit" or "plain"."""
        if self.speculate not in (None, "none"):
            return "speculate"
        if self.predictor is not None or self.force_exit_layers:
            return "exit"
        return "plain"

    def check(self) -> None:
        """Raise ValueError, one line naming the option, for a value no mode could use."""
        if self.speculate is not None and self.speculate != "none" and self.speculate not in CHAIN_DRAFTERS \
                and not _is_model_path(self.speculate):
            raise ValueError(_bad("speculate", self.speculate,
                                  f"an unknown speculation drafter: use {', '.join(CHAIN_DRAFTERS)}, none or a "
                                  "draft model .gguf path"))
        if self.draft is not None and not _is_model_path(self.draft):
            raise ValueError(_bad("draft", self.draft, "not a .gguf draft model path"))
        if not _is_int(self.draft_max) or not 1 <= self.draft_max <= MAX_DRAFT:
            raise ValueError(_bad("draft_max", self.draft_max, f"must be in 1..{MAX_DRAFT}"))
        if self.draft_length is not None and (not _is_int(self.draft_length)
                                              or not 1 <= self.draft_length <= self.draft_max):
            raise ValueError(_bad("draft_length", self.draft_length, f"must be in 1..draft_max ({self.draft_max})"))
        if isinstance(self.drafter, str) and self.drafter not in EXIT_DRAFTERS and not _is_model_path(self.drafter):
            raise ValueError(_bad("drafter", self.drafter, f"an unknown drafter: use {', '.join(EXIT_DRAFTERS)}, "
                                  "a draft model .gguf path or a Drafter"))
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(_bad("exit_rule", self.exit_rule, f"an unknown exit rule: use {', '.join(EXIT_RULES)}"))
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(_bad("kv_policy", self.kv_policy, f"an unknown kv_policy: use {', '.join(KV_POLICIES)}"))
        for name in ("exit_threshold", "exit_threshold_unmatched"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):  # NaN fails
                raise ValueError(_bad(name, value, "must be in (0, 1]"))
        for name in ("offline_layers", "force_exit_layers"):
            value = getattr(self, name)
            if value is not None and not all(_is_int(v) and v >= 0 for v in value):
                raise ValueError(_bad(name, list(value), "must be layer numbers (0 and up)"))
        if self.online_offsets is not None and not all(_is_int(v) for v in self.online_offsets):
            raise ValueError(_bad("online_offsets", list(self.online_offsets), "must be integers"))

    def replace(self, **changes) -> "DecodeOptions":
        return dataclasses.replace(self, **changes)

    @property
    def chain_drafter(self) -> str:
        """What drafts speculation's chains: a chain drafter's name or a draft model's path."""
        return self.draft or self.speculate

    @property
    def exit_drafter(self):
        return self.draft or self.drafter


@dataclass(frozen=True)
class ModelOptions:
    """How the model is loaded: llama_cpp.Llama's arguments that specee-pc's commands set."""

    n_ctx: int = option(2048, "--ctx-size", short="-c", type=int, metavar="N",
                        help="context size in tokens, at least 16; 0: the model's training context")
    n_threads: Optional[int] = option(
        None, "--threads", short="-t", type=int, metavar="N", help="CPU threads",
        default_text="all cores on machines of up to 4, half of them above")
    n_gpu_layers: int = option(0, "--n-gpu-layers", short="-ngl", type=int, metavar="N",
                               help="layers to offload to the GPU, -1 for all (needs a GPU build of "
                                    "llama-cpp-python)")
    offload_first_layers: bool = option(
        False, "--offload-first", type=bool,
        help="put the first -ngl layers and the LM head on the GPU, the rest on the CPU (SpecEE's reversed "
             "offload: early exits skip the CPU layers)")

    def __post_init__(self):
        if self.n_threads is None:
            object.__setattr__(self, "n_threads", default_threads())
        self.check()

    def check(self) -> None:
        if not _is_int(self.n_ctx) or 0 < self.n_ctx < 16 or self.n_ctx < 0:
            raise ValueError(_bad("n_ctx", self.n_ctx, "must be at least 16 tokens (or 0: the model's)",
                                  cls=ModelOptions))
        if not _is_int(self.n_threads) or self.n_threads < 1:
            raise ValueError(_bad("n_threads", self.n_threads, "must be at least 1", cls=ModelOptions))
        if not _is_int(self.n_gpu_layers) or self.n_gpu_layers < -1:
            raise ValueError(_bad("n_gpu_layers", self.n_gpu_layers, "must be -1 (all) or more",
                                  cls=ModelOptions))

    def llama_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of specee_pc.Llama (and, less offload_first_layers, llama_cpp.Llama)."""
        return dataclasses.asdict(self)


def default_threads() -> int:
    # all usable cores on small machines; half of them on big ones, where they are mostly
    # hyper-threads that slow llama.cpp's matmuls down
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n if n <= 4 else n // 2


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(name: str, value, what: str, cls=None) -> str:
    meta = _fields(cls or DecodeOptions)[name].metadata
    return f"{meta['short'] or meta['flag']} ({name}) {what}, got {value!r}"


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------- command lines

def add_arguments(parser, cls, names: Optional[Iterable[str]] = None, *, defaults: Optional[Dict[str, Any]] = None,
                  default_texts: Optional[Dict[str, str]] = None, sweep: bool = False,
                  words: Optional[Dict[str, Sequence[str]]] = None) -> None:
    """Add the flags of cls's fields (all, or names) to an argparse parser or group. defaults: a
    command's own defaults (help shows them), default_texts: what a None default means there.
    sweep: bench's comma-separated lists under the fields' sweep flags, each value checked by cls
    ("default": the field's default) or one of the command's own words for that field."""
    fields = _fields(cls)
    defaults = defaults or {}
    for name in (names or fields):
        f = fields[name]
        meta = f.metadata
        default = defaults.get(name, [f.default] if sweep else f.default)
        if default is None:
            shown = (default_texts or {}).get(name) or meta["default_text"] or f.default
        elif isinstance(default, (list, tuple)):
            shown = ",".join(_DEFAULT_WORD if v is None else str(v) for v in default) or "none"
        else:
            shown = default
        if sweep:
            flags = [meta["sweep"]]
            kwargs = dict(type=_sweep_parser(cls, name, (words or {}).get(name, ())), metavar="V1,V2",
                          default=list(default),
                          help=f"{meta['help']}: comma-separated values, each benchmarked; {_DEFAULT_WORD!r}: "
                               f"{meta['default_text'] or f.default} (default: {shown})")
        elif meta["type"] is bool:
            flags = [meta["flag"]]
            kwargs = dict(action="store_true", default=default, help=meta["help"])
        else:
            flags = [meta["short"], meta["flag"]] if meta["short"] else [meta["flag"]]
            kwargs = dict(default=default, help=f"{meta['help']} (default: {shown})")
            for key in ("choices", "type", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        action = parser.add_argument(*flags, dest=name, **kwargs)
        action.specee_option = (cls.__name__, name, sweep)


_DEFAULT_WORD = "default"


def _sweep_parser(cls, name: str, words: Sequence[str]):
    one = _fields(cls)[name].metadata["type"] or str

    def parse(text: str) -> list:
        values = []
        for word in (w.strip() for w in text.split(",") if w.strip()):
            if word in words:
                values.append(word)
                continue
            try:
                value = None if word == _DEFAULT_WORD else one(word)
                cls(**{name: value})
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            values.append(value)
        return values or [None]
    return parse


def from_args(cls, args, skip: Sequence[str] = (), **overrides):
    """cls from an argparse namespace that add_arguments filled (fields it lacks, or skips, keep
    their defaults); raises ValueError on a bad value."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name) and f.name not in skip
              and not (getattr(args, f.name) is None and f.default is not None)}  # None: not given
    values.update(overrides)
    return cls(**values)


def add_mode_arguments(parser) -> None:
    """run's and serve's switches between the modes (speculation is their default)."""
    parser.add_argument("--early-exit", action="store_true",
                        help="decode with early exit instead of speculation (implied by --kv-policy, "
                             "--force-exit-layers)")
    parser.add_argument("--no-exit", action="store_true",
                        help="decode with the full model only: no speculation, no early exit")


def decode_options_from_args(args) -> DecodeOptions:
    """run's and serve's DecodeOptions: speculation unless --early-exit (or an exit-only flag) or
    --no-exit; raises ValueError on a bad value."""
    options = from_args(DecodeOptions, args)
    explicit_exit = args.early_exit or args.kv_policy is not None or bool(options.force_exit_layers)
    if args.no_exit:
        return options.replace(speculate=None, predictor=None, force_exit_layers=())
    if explicit_exit:
        return options.replace(speculate=None, predictor=options.predictor or "auto")
    if options.speculate == "none":
        return options.replace(speculate=None, predictor=None)
    return options
