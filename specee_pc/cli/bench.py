"""`specee-pc bench`: specee-pc against llama.cpp (llama-cpp-python), side by side, in one run.

For each prompt, every configuration decodes greedily in turn: vanilla llama-cpp-python,
speculative decoding (prompt lookup, and a draft model with --draft), and specee with each KV
policy, drafter, exit rule and threshold asked for; repetitions are interleaved the same way.
Reports decode tok/s (prompt processing apart), speedup over vanilla (median of per-prompt
ratios), exits, predictor and drafter cost (a draft head's against one target layer plus its LM
head, timed after each prompt), candidate hits, and quality: whether each output is
vanilla's greedy output, and where it departs. Lossless configurations whose output differs
from vanilla's are flagged, with a replay of the same batches telling a bug from llama.cpp's
batch-shape numerics. Writes PREFIX.json and PREFIX.md (and PNGs with --plot).
"""
import argparse
import contextlib
import datetime
import os
import sys
from typing import Dict, List, Optional

from .parser import ArgumentParser
from ..drafters import HEAD_DRAFTERS
from ..prompt_sets import HELD_OUT_PER_SET, SETS
from .reports import name_list, run_command, write_report
from ..options import KV_POLICIES, DecodeOptions, ModelOptions, add_arguments, from_args, layer_list

SWEPT = ("predictor", "kv_policy", "exit_rule", "exit_threshold", "exit_threshold_unmatched", "speculate")


def build_parser() -> ArgumentParser:
    from ..benchmark.configs import BASELINES

    p = ArgumentParser(prog="specee-pc bench", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.gguf", help="target model (default: the embedded SmolLM2-135M)")
    add_arguments(p, DecodeOptions, ["predictor", "kv_policy", "exit_rule", "exit_threshold",
                                     "exit_threshold_unmatched", "speculate"], sweep=True,
                  defaults={"predictor": ["auto"], "kv_policy": list(KV_POLICIES), "speculate": ["auto"]},
                  words={"kv_policy": ("none",), "speculate": ("none", "draft")})
    add_arguments(p, DecodeOptions, ["draft", "draft_max", "offline_layers", "online_offsets"])
    add_arguments(p, ModelOptions)
    p.add_argument("--sets", type=name_list, default=list(SETS), metavar="S1,S2",
                   help=f"prompt sets shipped with specee-pc (default: {','.join(SETS)})")
    p.add_argument("--per-set", type=int, default=4, metavar="N",
                   help=f"first prompts of each set, at most {HELD_OUT_PER_SET}: "
                        "those calibrate holds out (default: 4)")
    p.add_argument("-n", "--n-predict", type=int, default=128, metavar="N", help="tokens per generation (default: 128)")
    p.add_argument("--runs", type=int, default=3, help="timed repetitions per prompt and configuration (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per configuration first (default: 1)")
    p.add_argument("--baselines", type=name_list, default=list(BASELINES), metavar="B1,B2",
                   help="speculative decoding baselines: lookup (prompt lookup), draft (needs --draft); none")
    p.add_argument("--prompts", metavar="FILE.jsonl",
                   help="prompts from this file instead of the shipped sets: one JSON object a line with \"prompt\" "
                        "(or \"turns\": its first is used)")
    p.add_argument("--lookup-tokens", type=layer_list, default=[10, 2], metavar="N1,N2",
                   help="llama-cpp-python prompt lookup baselines, one per num_pred_tokens (default: 10,2: its "
                        "default and its README's setting for CPUs)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted by the draft model (default: 4)")
    p.add_argument("--oracle", action="store_true",
                   help="also measure the oracle bound of each drafter's candidates on these prompts (a full-model "
                        "pass recording every layer, and per-layer step timing)")
    p.add_argument("-o", "--output", metavar="PREFIX",
                   help="writes PREFIX.json and PREFIX.md (default: bench-<model name> in this folder)")
    p.add_argument("--plot", action="store_true", help="also PREFIX-threshold.png and PREFIX-exit-layers.png")
    return p


def check_args(args) -> None:
    """What the flags' own types cannot check; a list of option values was checked value by value."""
    from ..benchmark.configs import BASELINES

    args.n_threads = from_args(ModelOptions, args).n_threads
    from_args(DecodeOptions, args, skip=SWEPT)
    args.speculate = [] if args.speculate == ["none"] else args.speculate
    args.kv_policy = [] if args.kv_policy == ["none"] else args.kv_policy
    bad = [v for v in args.baselines if v not in BASELINES]
    if bad:
        raise ValueError(f"unknown baseline {', '.join(bad)}; choose from {', '.join(BASELINES)}")
    if not 1 <= args.per_set <= HELD_OUT_PER_SET:
        raise ValueError(f"--per-set must be 1..{HELD_OUT_PER_SET} (prompts beyond that trained the predictors)")
    if args.runs < 1 or args.n_predict < 2 or min(args.lookup_tokens or [1]) < 1 or args.draft_tokens < 1:
        raise ValueError("--runs, --lookup-tokens and --draft-tokens must be at least 1, and -n at least 2")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from None


def measure_oracle(args, model: str, weights, prompts, k: int, head_files: Dict[str, str]) -> dict:
    """Oracle exits of each drafter's candidates on the bench prompts, and the per-layer step times;
    head_files: the predictor file of each head-drafted configuration, by drafter name."""
    import numpy as np

    from ..drafters import DraftModelDrafter, NgramDrafter
    from ..oracle import oracle_exits, speed_bound, step_ms_by_exit_layer

    llama_kwargs = dict(n_gpu_layers=args.n_gpu_layers)
    step_ms = step_ms_by_exit_layer(model, args.n_threads, **llama_kwargs)
    drafters = {"ngram": NgramDrafter}
    if args.draft:
        drafters["draft"] = lambda: DraftModelDrafter(args.draft, target_vocab=weights.n_vocab, n_ctx=args.n_ctx,
                                                      n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers)
    for name, path in head_files.items():
        drafters[name] = lambda kind=HEAD_DRAFTERS[name], path=path: kind(path, weights, n_ctx=args.n_ctx,
                                                                            n_threads=args.n_threads)
    result = {}
    for name, make in drafters.items():
        drafter = make()
        try:
            layers = oracle_exits(model, drafter, prompts, args.n_predict, k, args.n_threads, n_ctx=args.n_ctx,
                                  **llama_kwargs)
        finally:
            if hasattr(drafter, "close"):
                drafter.close()
        result[name] = {"bound": speed_bound(layers, step_ms), "mean_exit_layer": float(np.mean(layers)),
                        "steps": int(len(layers)),
                        "exit_layer_histogram": np.bincount(layers, minlength=len(step_ms)).tolist(),
                        "step_ms_by_exit_layer": step_ms.tolist()}
    return result


def timed_runs(configs, prompts, tokens, args, after_prompt=None) -> list:
    """Every configuration on every prompt, repetitions interleaved, after untimed warm-ups;
    after_prompt(prompt name, rep), if given, runs after each prompt's configurations."""
    from tqdm import tqdm

    from ..benchmark.runs import timed_run

    first = prompts[0].name
    for config in tqdm(configs, desc="warm-up", unit="config", disable=not args.warmup):
        for _ in range(args.warmup):
            timed_run(config, first, tokens[first], min(args.n_predict, 32), -1)
    runs = []
    with tqdm(total=args.runs * len(prompts) * len(configs), desc="bench", unit="gen") as bar:
        for rep in range(args.runs):
            for i, prompt in enumerate(prompts):
                shift = (rep + i) % len(configs)  # no configuration always runs first
                for config in configs[shift:] + configs[:shift]:
                    bar.set_postfix_str(f"{config.name} on {prompt.name}")
                    runs.append(timed_run(config, prompt.name, tokens[prompt.name], args.n_predict, rep))
                    bar.update()
                if after_prompt is not None:
                    bar.set_postfix_str(f"draft head budget after {prompt.name}")
                    after_prompt(prompt.name, rep)
    return runs


@contextlib.contextmanager
def head_budget_probe(model: str, heads: dict, args, budgets: dict):
    """The function that times the draft heads' budget into budgets[(prompt, rep)]: one target
    layer (on a timing model of its own) and each head's LM head (heads: predictor file -> head);
    None without heads. Run after each prompt's configurations, it compares the drafter with a
    budget timed minutes apart at most, where one budget for a whole bench was not comparable
    (a shared machine's speed drifts by more than the margin over it)."""
    if not heads:
        yield None
        return
    from ..oracle import layer_ms_of, timing_model

    with timing_model(model, args.n_threads, n_gpu_layers=args.n_gpu_layers) as llm:
        layer_ms_of(llm, runs=1)  # untimed: the first decodes of a fresh model are slower

        def probe(prompt: str, rep: int) -> None:
            budgets[(prompt, rep)] = (layer_ms_of(llm, runs=3),
                                      {path: head.time_lm_head(20) for path, head in heads.items()})

        yield probe


def bench(args) -> int:
    import llama_cpp

    from ..benchmark.configs import BenchModels, build_configs, close_configs
    from ..benchmark.machine import machine_info
    from ..benchmark.quality import check_outputs
    from ..benchmark.report import draft_head_cost, flags, markdown, summarize
    from ..calibration import chat_tokens
    from ..cpu_backend import check_plain_llama_cpp
    from ..default_model import default_model_path
    from ..model_file import open_weights
    from ..predictor_file import read_predictor_file
    from ..prompt_sets import first_prompts, user_prompts
    from ..replay import ReplayExits

    check_args(args)
    check_plain_llama_cpp("the benchmark's reference (vanilla llama-cpp-python)")
    model = args.model or default_model_path()
    weights = open_weights(model)
    prompts = user_prompts(args.prompts) if args.prompts else first_prompts(args.sets, args.per_set)
    models = BenchModels(model, predictors=args.predictor, draft=args.draft, n_ctx=args.n_ctx,
                         n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers,
                         offload_first=args.offload_first_layers)
    configs = build_configs(models, baselines=args.baselines, policies=args.kv_policy, rules=args.exit_rule,
                            thresholds=args.exit_threshold, thresholds_unmatched=args.exit_threshold_unmatched,
                            lookup_tokens=args.lookup_tokens,
                            draft_tokens=args.draft_tokens, offline_layers=args.offline_layers,
                            online_offsets=args.online_offsets, speculate=args.speculate, draft_max=args.draft_max)
    try:
        vanilla = configs[0].llm
        tokens = {p.name: chat_tokens(vanilla, p.text) for p in prompts}
        room = args.n_ctx - args.n_predict - 8  # a few cells for drafts and repair batches
        too_long = [f"{name} ({len(t)} tokens)" for name, t in tokens.items() if len(t) > room]
        if too_long:
            raise ValueError(f"prompts longer than the context allows with -n {args.n_predict}: "
                             f"{', '.join(too_long)}; raise -c")
        prompt_sets = {p.name: p.set_name for p in prompts}
        specee = [c for c in configs if c.kind == "specee"]
        head_configs = [c for c in specee if c.drafter in HEAD_DRAFTERS]
        heads = {c.options["predictor"]: c.llm.exit_drafter.head for c in head_configs}
        budgets = {}
        with head_budget_probe(model, heads, args, budgets) as probe:
            runs = timed_runs(configs, prompts, tokens, args, after_prompt=probe)
        # the replay must place layers as the configurations did: no replay under reversed offload
        replay = (None if args.offload_first_layers and args.n_gpu_layers else
                  llama_cpp.Llama(model, logits_all=True, draft_model=ReplayExits([]), **models.llama_kwargs()))
        try:
            checks = check_outputs(configs, runs, tokens, vanilla, replay)
        finally:
            if replay is not None:
                replay.close()
        k = read_predictor_file(specee[0].options["predictor"]).k if specee else 4
        oracle = (measure_oracle(args, model, weights, prompts, k,
                                 {c.drafter: c.options["predictor"] for c in head_configs}) if args.oracle else None)
        entries = summarize(configs, runs, checks, prompt_sets, weights.n_layer, oracle)
        head_cost = (draft_head_cost(runs, {c.name: c.options["predictor"] for c in head_configs}, budgets,
                                     {path: head.n_draft_vocab for path, head in heads.items()}) if heads else None)
        report = {
            "format": "specee-pc bench 1",
            "command": ["specee-pc", "bench"] + args.argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "settings": {"model": os.path.abspath(model), "model_name": os.path.basename(model),
                         "n_layer": weights.n_layer, "draft": args.draft,
                         "sets": sorted({p.set_name for p in prompts}) if args.prompts else args.sets,
                         "prompt_file": args.prompts, "per_set": args.per_set,
                         "prompts": len(prompts), "n_new": args.n_predict, "runs": args.runs, "warmup": args.warmup,
                         "threads": args.n_threads, "n_ctx": args.n_ctx, "n_gpu_layers": args.n_gpu_layers,
                         "offload_first": args.offload_first_layers, "offline_layers": args.offline_layers,
                         "online_offsets": args.online_offsets},
            "configs": entries,
            "draft_head_cost": head_cost,
            "flags": flags(checks, configs),
            "oracle": oracle,
            "prompts": [{"name": p.name, "tokens": len(tokens[p.name])} for p in prompts],
            "outputs": {c.name: {r.prompt: r.tokens for r in runs if r.config == c.name and r.rep == 0}
                        for c in configs},
            "runs": [{"config": r.config, "prompt": r.prompt, "rep": r.rep, "tokens": len(r.tokens),
                      "prompt_seconds": r.prompt_seconds, "decode_seconds": r.decode_seconds,
                      "decode_tokens_per_second": r.decode_tokens_per_second, "exit": r.exit, "spec": r.spec}
                     for r in runs],
        }
    finally:
        close_configs(configs)
    prefix = args.output or f"bench-{os.path.splitext(os.path.basename(model))[0]}"
    written = write_report(prefix, report, markdown(report))
    if args.plot:
        from ..benchmark.plots import plot_report
        written += plot_report(report, prefix)
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    wrong = [f for f in report["flags"] if f["replay_identical"] is False]
    if wrong:
        print(f"specee-pc bench: {len(wrong)} outputs of lossless configurations are wrong (see the flags)",
              file=sys.stderr)
        return 3
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("bench", build_parser(), bench, argv)
