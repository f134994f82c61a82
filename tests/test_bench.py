"""specee-pc bench: runs end to end on a tiny setting, writes a well-formed report, and flags a
lossless configuration whose output is not vanilla's. (Speed is never asserted here.)"""
import json
import math
import subprocess
import sys

from conftest import N_THREADS, constant_predictors

import llama_cpp
import specee_pc
from specee_pc.benchmark.configs import BenchConfig, BenchModels, build_configs, close_configs
from specee_pc.benchmark.quality import check_outputs
from specee_pc.benchmark.report import draft_head_cost, flags, summarize
from specee_pc.benchmark.runs import Run, exited_tokens, first_divergence, greedy_matches, greedy_tokens, timed_run
from specee_pc.calibration import chat_tokens
from specee_pc.prompt_sets import first_prompts
from specee_pc.replay import ReplayExits

CLI = [sys.executable, "-m", "specee_pc.cli"]


def run_cli(args, cwd):
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_tiny_bench_writes_a_well_formed_report(tmp_path):
    result = run_cli(["bench", "--sets", "mt_bench,humaneval", "--per-set", "1", "-n", "12", "--runs", "2",
                      "--warmup", "0", "-t", str(N_THREADS), "-o", "out", "--plot", "--lookup-tokens", "2",
                      "--offline-layers", "22,24,26", "--online-offsets", "none"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    names = [c["name"] for c in report["configs"]]
    # the shipped file carries a draft head: its configurations draft with it, merged with lookup
    assert names == ["vanilla", "llama-cpp-python lookup 2", "spec auto", "specee exact head+lookup verify 0.50",
                     "specee mask head+lookup verify 0.50"]
    spec = report["configs"][2]
    x = spec["speculation"]  # every token of a run came from a round, the prompt's first apart
    assert x["rounds"] > 0 and x["tokens_per_round"] >= 1 and sum(x["gamma_histogram"].values()) == x["rounds"]
    assert len(spec["options"]["batch_ms"]) == 5 and spec["quality"]["exactness"] in ("identical",
                                                                                       "batch-shape numerics only")
    assert report["settings"]["prompts"] == 2 and report["settings"]["threads"] == N_THREADS
    assert report["settings"]["offline_layers"] == [22, 24, 26] and report["settings"]["online_offsets"] == []
    assert report["machine"]["llama_cpp_python"] == "0.3.36" and report["machine"]["specee_pc"] == specee_pc.__version__
    assert len(report["runs"]) == 2 * 2 * len(names)
    for config in report["configs"]:
        assert config["decode_tokens_per_second"] > 0 and math.isfinite(config["speedup"])
        assert set(config["speedup_by_set"]) == {"mt_bench", "humaneval"}
    assert report["configs"][0]["speedup"] == 1.0
    for config in report["configs"][3:]:
        e = config["exits"]
        assert e["steps"] > 0 and 0 <= e["exit_ratio"] <= 1 and sum(e["exit_layer_histogram"]) == e["exits"]
        assert {il for il, n in enumerate(e["exit_layer_histogram"]) if n} <= {22, 24, 26}  # the schedule given
        assert config["quality"]["exactness"] in ("identical", "batch-shape numerics only", "lossy")
    # outputs are recorded, and a lossless configuration's differences are explained in the flags
    for flag in report["flags"]:
        assert flag["replay_identical"] is not False, flag
    mask = report["configs"][4]["quality"]  # lossy: judged step by step against the full model
    assert mask["exactness"] == "lossy" and 0 <= mask["greedy_agreement"] <= 1
    assert math.isclose(mask["greedy_agreement"] + mask["wrong_exits_per_token"]
                        + mask["full_depth_disagreements_per_token"], 1)
    assert mask["full_depth_disagreements_per_token"] >= 0
    assert report["configs"][3]["quality"]["greedy_agreement"] is None  # exact: judged by identity
    cost = report["draft_head_cost"]  # the budget timed after each prompt of each repetition
    assert cost["budget_probes"] == 2 * 2 and cost["failed_probes"] == 0 and cost["target_layer_ms"] > 0
    assert set(cost["configs"]) == set(names[3:]) and len(cost["draft_lm_head_ms"]) == 1
    assert all(ms > 0 for ms in cost["draft_lm_head_ms"].values()) and all(n > 0 for n in cost["draft_vocab"].values())
    assert all(c["ratio"] > 0 and c["runs"] == 2 * 2 for c in cost["configs"].values())
    assert cost["within_budget"] == (cost["ratio_max"] < 1)
    table = (tmp_path / "out.md").read_text()
    assert table.count("\n| specee") == 2 + 2 and "speedup" in table and "Draft head cost" in table
    assert "\n| spec auto |" in table and "tokens/round" in table
    assert "- specee mask head+lookup verify 0.50: " in table and "wrong exits" in table
    assert "Exit schedule: offline layers [22, 24, 26], online offsets none." in table
    assert (tmp_path / "out-threshold.png").stat().st_size > 0 and (tmp_path / "out-exit-layers.png").stat().st_size > 0
    assert "wrote" in result.stderr and not list(tmp_path.glob("*.part"))


def test_a_lossy_configuration_claiming_exactness_is_flagged(model_path):
    """The harness catches a wrong configuration: mask-policy exits with predictors that always fire,
    presented as lossless, give outputs that llama-cpp-python decoding the same batches does not."""
    models = BenchModels(model_path, n_ctx=1024, n_threads=N_THREADS)
    configs = build_configs(models, baselines=(), policies=())
    weights = specee_pc.model_file.open_weights(model_path)
    always = constant_predictors(weights, [16, 20, 24, 27])
    for policy in ("exact", "mask"):
        llm = specee_pc.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False, predictor=always,
                              kv_policy=policy)
        configs.append(BenchConfig(f"claims exact ({policy})", "specee", True, llm, drafter="ngram"))
    prompts = first_prompts(["humaneval"], 1)
    tokens = {p.name: chat_tokens(configs[0].llm, p.text) for p in prompts}
    runs = [timed_run(c, p.name, tokens[p.name], 48, 0) for c in configs for p in prompts]
    replay = llama_cpp.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False, logits_all=True,
                             draft_model=ReplayExits([]))
    checks = check_outputs(configs, runs, tokens, configs[0].llm, replay)
    report = summarize(configs, runs, checks, {p.name: "humaneval" for p in prompts}, weights.n_layer)
    found = flags(checks, configs)
    replay.close()
    close_configs(configs)
    exact, mask = report[1], report[2]
    assert exact["exits"]["exits"] > 0 and mask["exits"]["exits"] > 0
    assert exact["quality"]["exactness"] in ("identical", "batch-shape numerics only")
    assert mask["quality"]["exactness"] == "WRONG"
    assert [f["config"] for f in found if f["replay_identical"] is False] == ["claims exact (mask)"]
    assert "WRONG" in found[-1]["verdict"]


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 5, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_exit_tokens_are_told_from_full_depth_tokens(model_path):
    """Forced exits under mask exit every step but the prompt's: the first output token alone is
    a full-depth one, and it is the full model's greedy token."""
    llm = specee_pc.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, kv_policy="mask",
                          force_exit_layers=[20])
    prompt = llm.tokenize(b"The capital of France is")
    output, _ = greedy_tokens(llm, prompt, 12)
    exited = exited_tokens(llm.exit_stats.exits_at, len(prompt), len(output))
    llm.close()
    assert len(output) == 12 and not exited[0] and exited[1:].all()
    every_row = llama_cpp.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, logits_all=True)
    matches = greedy_matches(every_row, prompt, output)
    every_row.close()
    assert matches[0] and not matches.all()  # layer 20's tokens are not all the full model's
    assert exited_tokens([(5, 20, 1), (7, 22, 2), (40, 20, 3)], 5, 4).tolist() == [False, True, False, True]


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args in (["--per-set", "30"], ["--sets", "nope"], ["--policies", "fast"], ["missing.gguf"],
                 ["--offline-layers", "20,29", "--baselines", "none"], ["--speculate", "psychic"],
                 ["--prompts", "missing.jsonl"], ["--draft-max", "0"]):
        result = run_cli(["bench", "--warmup", "0", *args], tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("specee-pc bench: error:"), result.stderr
    assert not list(tmp_path.iterdir())


def test_draft_head_cost_pairs_each_run_with_the_budget_timed_after_its_prompt():
    """A run is judged against the budget of its own prompt and repetition, weighted by its tokens:
    the drafter's 10 ms over 10 tokens against ("a", 0)'s 0.5 ms and 3 ms over 2 tokens against
    ("b", 0)'s 1.0 ms make 13 / 7 = 1.857x; pooling the budgets, or counting the run without a
    budget or the one whose probe failed, would each give another answer."""
    def run(prompt, rep, n_tokens, drafter_ms):
        return Run("head cfg", prompt, rep, n_tokens, tokens=list(range(n_tokens + 1)), prompt_seconds=1.0,
                   decode_seconds=1.0, exit={"drafter_ms": drafter_ms})
    budgets = {("a", 0): (0.3, {"p.gguf": 0.2}), ("b", 0): (0.6, {"p.gguf": 0.4}),
               ("a", 1): (0.3, {"p.gguf": -1.0})}  # ms: layer, each head's LM head; ("a", 1) failed
    runs = [run("a", 0, 10, 10.0), run("b", 0, 2, 3.0), run("a", 1, 10, 1.0), run("b", 1, 10, 1.0)]
    cost = draft_head_cost(runs, {"head cfg": "p.gguf"}, budgets, {"p.gguf": 4096})
    head = cost["configs"]["head cfg"]
    assert math.isclose(head["ratio"], 13 / 7) and math.isclose(cost["ratio_max"], 13 / 7) and not cost["within_budget"]
    assert head["runs"] == 2 and head["runs_over"] == 2 and math.isclose(head["median_run_ratio"], 1.75)
    assert math.isclose(head["drafter_ms_per_token"], 13 / 12)
    assert cost["budget_probes"] == len(cost["budgets"]) == 3 and cost["failed_probes"] == 1
    assert math.isclose(cost["target_layer_ms"], 0.45) and math.isclose(cost["draft_lm_head_ms"]["p.gguf"], 0.3)
    assert cost["budgets"][1] == {"prompt": "b", "rep": 0, "target_layer_ms": 0.6, "draft_lm_head_ms": {"p.gguf": 0.4}}
