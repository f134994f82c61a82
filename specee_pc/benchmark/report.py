"""The benchmark's report: per-configuration speed, exits and quality, as JSON and a markdown table.

Speedups are medians of per-prompt ratios to vanilla; a prompt's ratio is the median over
repetitions of (configuration tok/s / vanilla tok/s) in the same repetition, since the
configurations of one repetition ran back to back (on a shared machine, noise drifts slowly).
"""
import statistics
from typing import Dict, List, Optional, Sequence

from .quality import OutputCheck
from .runs import Run

EXIT_COUNTERS = ("steps", "exits", "accepted", "layers_used", "checks", "lm_heads", "predictor_ms", "drafter_ms",
                 "first_pass_ms", "repair_ms", "candidate_steps", "candidate_hits")


def median(values) -> Optional[float]:
    values = list(values)
    return statistics.median(values) if values else None


def ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def speed(runs: Sequence[Run], vanilla: Dict[tuple, Run], prompt_sets: Dict[str, str]) -> dict:
    by_prompt: Dict[str, List[float]] = {}
    for r in runs:
        base = vanilla[(r.prompt, r.rep)].decode_tokens_per_second
        if base > 0 and r.decode_tokens_per_second > 0:
            by_prompt.setdefault(r.prompt, []).append(r.decode_tokens_per_second / base)
    per_prompt = {p: statistics.median(v) for p, v in by_prompt.items()}
    by_set: Dict[str, List[float]] = {}
    for p, v in per_prompt.items():
        by_set.setdefault(prompt_sets[p], []).append(v)
    return {
        "decode_tokens_per_second": median(r.decode_tokens_per_second for r in runs),
        "prompt_tokens_per_second": median(r.prompt_tokens / r.prompt_seconds for r in runs if r.prompt_seconds > 0),
        "speedup": median(per_prompt.values()),
        "speedup_by_set": {s: statistics.median(v) for s, v in by_set.items()},
        "speedup_by_prompt": per_prompt,
    }


def exits(runs: Sequence[Run], n_layer: int, repaired: bool) -> dict:
    """repaired: the exact policy, whose repair batches confirm exits (or not)."""
    total = {k: sum(r.exit[k] for r in runs) for k in EXIT_COUNTERS}
    layers = [il for r in runs for il in r.exit["exit_layers"]]
    steps = total["steps"]
    # per token decoded (after the first): an exact-policy exit confirmed by its repair batch
    # gives two tokens for one step
    decoded = sum(len(r.tokens) - 1 for r in runs)
    ms_per_token = ratio(sum(r.decode_seconds for r in runs) * 1e3, decoded)
    predictor_ms = ratio(total["predictor_ms"], decoded)
    return {
        **total,
        "exit_ratio": ratio(total["exits"], steps),
        "mean_layers": ratio(total["layers_used"], steps) if steps else float(n_layer),
        "mean_exit_layer": statistics.mean(layers) if layers else None,
        "exit_layer_histogram": [layers.count(il) for il in range(n_layer)],
        "confirmed_ratio": ratio(total["accepted"], total["exits"]) if repaired else None,
        "candidate_hit_rate": ratio(total["candidate_hits"], total["candidate_steps"]),
        "predictor_ms_per_token": predictor_ms,
        "predictor_share_of_step": (ratio(predictor_ms, ms_per_token)
                                    if predictor_ms is not None and ms_per_token else None),
        "drafter_ms_per_token": ratio(total["drafter_ms"], decoded),
        "repair_ms_per_token": ratio(total["repair_ms"], decoded),
    }


def speculation(runs: Sequence[Run]) -> dict:
    """Speculation rounds summed over runs: tokens per round, acceptance by chain position, the
    histogram of drafts verified per round, what drafting and verification cost per token."""
    rounds = sum(r.spec["rounds"] for r in runs)
    tokens = sum(r.spec["tokens"] for r in runs)
    drafted = sum(r.spec["drafted"] for r in runs)
    accepted = sum(r.spec["accepted"] for r in runs)
    gammas: Dict[int, int] = {}
    sources: Dict[str, int] = {}
    positions: List[List[int]] = []
    for r in runs:
        for g, n in r.spec["gammas"].items():
            gammas[int(g)] = gammas.get(int(g), 0) + n
        for name, n in r.spec["sources"].items():
            sources[name] = sources.get(name, 0) + n
        for i, (a, n) in enumerate(r.spec["by_position"]):
            while len(positions) <= i:
                positions.append([0, 0])
            positions[i][0] += a
            positions[i][1] += n
    return {"rounds": rounds, "tokens_per_round": ratio(tokens, rounds), "acceptance": ratio(accepted, drafted),
            "acceptance_by_position": [ratio(a, n) for a, n in positions],
            "verified_by_position": [n for _, n in positions],
            "gamma_histogram": dict(sorted(gammas.items())), "rounds_by_drafter": sources,
            "draft_ms_per_token": ratio(sum(r.spec["draft_ms"] for r in runs), tokens),
            "verify_ms_per_token": ratio(sum(r.spec["verify_ms"] for r in runs), tokens),
            "prefill_ms_per_prompt_token": ratio(sum(r.spec["prefill_ms"] for r in runs),
                                                 sum(r.spec["prefill_tokens"] for r in runs))}


def quality(checks: Sequence[OutputCheck], lossless: bool) -> dict:
    differing = [c for c in checks if not c.identical]
    judged = [c for c in checks if c.greedy_agreeing is not None]
    judged_tokens = sum(c.tokens for c in judged)
    if lossless and not differing:
        exactness = "identical"
    elif lossless and any(c.replay_identical is False for c in differing):
        exactness = "WRONG"
    elif lossless and all(c.replay_identical for c in differing):
        exactness = "batch-shape numerics only"
    elif lossless:
        exactness = "differs"
    else:
        exactness = "lossy"
    return {
        "identical_share": ratio(len(checks) - len(differing), len(checks)),
        "first_divergence_median": median(c.first_divergence for c in differing),
        # share of vanilla's output reproduced before the first divergence, mean over prompts
        "agreeing_prefix": statistics.mean(
            (c.first_divergence if c.first_divergence is not None else c.reference_tokens) / max(c.reference_tokens, 1)
            for c in checks) if checks else None,
        # lossy: share of emitted tokens that are the full model's greedy token after their own prefix
        "greedy_agreement": ratio(sum(c.greedy_agreeing for c in judged), judged_tokens) if judged else None,
        # ... and the others, per emitted token: exit tokens that are not the full model's, and tokens
        # decoded at full depth that are not (attention without earlier exits' deeper K/V)
        "wrong_exits_per_token": ratio(sum(c.wrong_exits for c in judged), judged_tokens) if judged else None,
        "full_depth_disagreements_per_token": ratio(sum(c.tokens - c.greedy_agreeing - c.wrong_exits for c in judged),
                                                    judged_tokens) if judged else None,
        "exactness": exactness,
        "per_prompt": [{"prompt": c.prompt, "first_divergence": c.first_divergence, "logit_gap": c.logit_gap,
                        "replay_identical": c.replay_identical, "greedy_agreeing": c.greedy_agreeing,
                        "wrong_exits": c.wrong_exits, "tokens": c.tokens}
                       for c in checks],
    }


def summarize(configs, runs: Sequence[Run], checks: Sequence[OutputCheck], prompt_sets: Dict[str, str],
              n_layer: int, oracle: Optional[dict] = None) -> List[dict]:
    """One entry per configuration (see the module doc); oracle: {drafter: {"bound": ...}}."""
    vanilla = {(r.prompt, r.rep): r for r in runs if r.config == "vanilla"}
    entries = []
    for config in configs:
        mine = [r for r in runs if r.config == config.name]
        entry = {"name": config.name, "kind": config.kind, "lossless": config.lossless, "options": config.options,
                 **speed(mine, vanilla, prompt_sets)}
        if config.kind == "spec":
            entry["speculation"] = speculation(mine)
        if config.kind == "specee":
            entry["exits"] = exits(mine, n_layer, config.options.get("kv_policy") == "exact")
            if oracle and config.drafter in oracle:
                entry["oracle_bound"] = oracle[config.drafter]["bound"]
        if config.name != "vanilla":
            entry["quality"] = quality([c for c in checks if c.config == config.name], config.lossless)
        entries.append(entry)
    return entries


def flags(checks: Sequence[OutputCheck], configs) -> List[dict]:
    """Lossless configurations whose output is not vanilla's, with the diagnosis."""
    lossless = {c.name for c in configs if c.lossless}
    return [{"config": c.config, "prompt": c.prompt, "first_divergence": c.first_divergence,
             "logit_gap": c.logit_gap, "replay_identical": c.replay_identical, "verdict": c.verdict}
            for c in checks if c.config in lossless and not c.identical]


def fmt(value, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"### {s['model_name']}: {s['prompts']} prompts ({', '.join(s['sets'])}), {s['n_new']} tokens, "
             f"{s['runs']} runs, {s['threads']} threads, {report['machine']['cpu']}", "",
             *schedule_note(s),
             "| configuration | decode tok/s | speedup | oracle bound | prompt tok/s | layers/step | exit ratio "
             "| mean exit layer | predictor ms/tok (share) | drafter ms/tok | candidate hits | identical to vanilla "
             "| first divergence | greedy agreement | exactness |",
             "|" + "---|" * 15]
    for c in report["configs"]:
        e, q = c.get("exits"), c.get("quality")
        share = (f" ({fmt(e['predictor_share_of_step'], '.0%')})"
                 if e and e["predictor_share_of_step"] is not None else "")
        lines.append("| " + " | ".join([
            c["name"], fmt(c["decode_tokens_per_second"], ".1f"), fmt(c["speedup"], ".3f") + "x",
            fmt(c.get("oracle_bound"), ".2f") + ("x" if c.get("oracle_bound") else ""),
            fmt(c["prompt_tokens_per_second"], ".0f"),
            fmt(e and e["mean_layers"], ".1f"), fmt(e and e["exit_ratio"]), fmt(e and e["mean_exit_layer"], ".1f"),
            (fmt(e["predictor_ms_per_token"]) + share) if e else "–",
            fmt(e and e["drafter_ms_per_token"]), fmt(e and e["candidate_hit_rate"], ".0%"),
            fmt(q and q["identical_share"], ".0%"), fmt(q and q["first_divergence_median"], ".0f"),
            fmt(q and q["greedy_agreement"], ".1%"), q["exactness"] if q else "reference"]) + " |")
    lossy = [c for c in report["configs"] if c.get("quality") and c["quality"]["greedy_agreement"] is not None]
    if lossy:
        lines += ["", "Disagreements with the full model's greedy token, per emitted token: exit tokens, and tokens "
                      "decoded at full depth (attending without earlier exits' deeper K/V):", ""]
        lines += [f"- {c['name']}: {fmt(c['quality']['wrong_exits_per_token'], '.1%')} wrong exits, "
                  f"{fmt(c['quality']['full_depth_disagreements_per_token'], '.1%')} at full depth" for c in lossy]
    sets = list(report["configs"][0]["speedup_by_set"])
    lines += ["", "Speedup by prompt set (median of per-prompt ratios):", "",
              "| configuration | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for c in report["configs"][1:]:
        lines.append(f"| {c['name']} | " + " | ".join(fmt(c["speedup_by_set"].get(x), ".3f") for x in sets) + " |")
    spec = [c for c in report["configs"] if c.get("speculation")]
    if spec:
        lines += ["", "Speculation (specee-pc's decode loop): tokens per verification round, acceptance of verified "
                      "drafts by chain position, rounds by drafts verified (0: plain decoding), measured batch "
                      "cost B(1) and c(k) = B(k)/B(1) at load:", "",
                  "| configuration | tokens/round | acceptance | by position | drafts per round | rounds by drafter "
                  "| draft ms/tok | verify ms/tok | B(1) ms, c(2..) |", "|" + "---|" * 9]
        for c in spec:
            x, ms = c["speculation"], c["options"]["batch_ms"]
            lines.append("| " + " | ".join([
                c["name"], fmt(x["tokens_per_round"]), fmt(x["acceptance"], ".0%"),
                " ".join(fmt(a) for a in x["acceptance_by_position"]) or "–",
                " ".join(f"{g}:{n}" for g, n in x["gamma_histogram"].items()),
                " ".join(f"{k}:{n}" for k, n in x["rounds_by_drafter"].items()) or "–",
                fmt(x["draft_ms_per_token"], ".3f"), fmt(x["verify_ms_per_token"]),
                f"{ms[0]:.1f}, " + " ".join(f"{m / ms[0]:.2f}" for m in ms[1:])]) + " |")
    cost = report.get("draft_head_cost")
    if cost:
        lm = ", ".join(f"{fmt(ms, '.3f')} ms over {cost['draft_vocab'][path]} tokens"
                       for path, ms in cost["draft_lm_head_ms"].items())
        lines += ["", f"Draft head cost against a budget of one target layer plus the head's LM head, timed after "
                      f"each prompt's configurations ({cost['budget_probes']} probes, {cost['failed_probes']} failed; "
                      f"medians: layer {fmt(cost['target_layer_ms'], '.3f')} ms, LM head {lm}). Each run against "
                      f"its own prompt's budget, drafter time over budget time summed over runs:", ""]
        lines += [f"- {name}: {fmt(c['drafter_ms_per_token'])} ms/token, **{fmt(c['ratio'], '.2f')}x** the budget "
                  f"(median run {fmt(c['median_run_ratio'], '.2f')}x; {c['runs_over']} of {c['runs']} runs at or over)"
                  for name, c in cost["configs"].items()]
        lines += ["", f"{'Within' if cost['within_budget'] else 'OVER'} budget "
                      f"(worst {fmt(cost['ratio_max'], '.2f')}x)."]
    if report["flags"]:
        lines += ["", f"**Flagged: {len(report['flags'])} outputs of lossless configurations differ from vanilla "
                      "greedy** (per prompt in the JSON's `flags`):", ""]
        lines += flag_summary(report["flags"], report["settings"]["prompts"])
    return "\n".join(lines) + "\n"


def schedule_note(settings: dict) -> List[str]:
    """The exit schedule the specee configurations ran with, where it was not their files'."""
    offline, online = settings.get("offline_layers"), settings.get("online_offsets")
    if offline is None and online is None:
        return []
    return [f"Exit schedule: offline layers {'the files' if offline is None else offline}, online offsets "
            f"{'the files' if online is None else online or 'none'}.", ""]


def flag_summary(found: Sequence[dict], n_prompts: int) -> List[str]:
    """One line per configuration, and one per output that the same-batch replay does not explain."""
    lines = []
    for name in dict.fromkeys(f["config"] for f in found):
        mine = [f for f in found if f["config"] == name]
        gaps = [abs(f["logit_gap"]) for f in mine if f["logit_gap"] is not None]
        gap = f"; full-model logit gap at the divergence at most {max(gaps):.2f}" if gaps else ""
        wrong = [f for f in mine if f["replay_identical"] is False]
        explained = sum(1 for f in mine if f["replay_identical"])
        why = (f"{len(wrong)} WRONG (the same-batch replay differs)" if wrong else
               "all reproduced by llama-cpp-python decoding the same batches (batch-shape numerics)"
               if explained == len(mine) else "no same-batch replay for this kind")
        lines.append(f"- {name}: {len(mine)}/{n_prompts} outputs differ; {why}{gap}")
        lines += [f"  - WRONG on {f['prompt']}: {f['verdict']}" for f in wrong]
    return lines


def draft_head_cost(runs: Sequence[Run], head_configs: Dict[str, str], budgets: Dict[tuple, tuple],
                    draft_vocab: Dict[str, int]) -> dict:
    """The draft heads' cost against their budget, one target layer plus the head's own LM head.

    head_configs: configuration name -> its predictor file; budgets[(prompt, rep)] = (target layer
    ms, {predictor file: its head's LM head ms}), timed after that prompt's configurations. Each
    run is paired with its own prompt's budget; the verdict is, per configuration, its drafter
    time over the budget times its tokens, summed over runs (slow runs weigh as they cost).
    Probes with a term <= 0 (a failed timing, a noisy slope) are left out and counted.
    """
    valid = {key: b for key, b in budgets.items() if b[0] > 0 and min(b[1].values()) > 0}
    per_config = {}
    for name, path in head_configs.items():
        mine = [r for r in runs if r.config == name and len(r.tokens) > 1 and (r.prompt, r.rep) in valid]
        tokens = [len(r.tokens) - 1 for r in mine]
        drafter = [r.exit["drafter_ms"] for r in mine]
        budget = [layer + lm[path] for layer, lm in (valid[(r.prompt, r.rep)] for r in mine)]
        per_run = [d / (b * t) for d, b, t in zip(drafter, budget, tokens)]
        per_config[name] = {"ratio": ratio(sum(drafter), sum(b * t for b, t in zip(budget, tokens))),
                            "median_run_ratio": median(per_run), "runs_over": sum(x >= 1 for x in per_run),
                            "runs": len(per_run), "drafter_ms_per_token": ratio(sum(drafter), sum(tokens))}
    measured = [c["ratio"] for c in per_config.values() if c["ratio"] is not None]
    worst = max(measured) if measured else None
    return {"configs": per_config, "ratio_max": worst, "within_budget": worst is not None and worst < 1,
            "target_layer_ms": median(b[0] for b in valid.values()),
            "draft_lm_head_ms": {path: median(b[1][path] for b in valid.values()) for path in draft_vocab},
            "draft_vocab": draft_vocab, "budget_probes": len(budgets), "failed_probes": len(budgets) - len(valid),
            "budgets": [{"prompt": p, "rep": rep, "target_layer_ms": layer, "draft_lm_head_ms": lm}
                        for (p, rep), (layer, lm) in budgets.items()]}
