"""What `specee-pc bench` compares. Each configuration is a model object that decodes greedily
through llama-cpp-python's generate(), so all of them are timed and checked the same way."""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from ..default_model import shipped_predictor_path
from ..drafters import sync_draft_context
from ..errors import SpeceeError
from ..llama import Llama
from ..model_file import open_weights
from ..predictor_file import read_predictor_file
from .baselines import GreedyDraftModel

BASELINES = ("lookup", "draft")
# llama-cpp-python's prompt lookup: its default, and the setting its README gives for CPUs
LOOKUP_TOKENS = (10, 2)
POLICIES = ("exact", "mask")
RULES = ("verify", "candidates")


@dataclass
class BenchConfig:
    name: str
    kind: str        # "vanilla" (llama-cpp-python), "speculative" (llama-cpp-python with a drafter), "specee"
                     # (early exit), "spec" (specee-pc's speculative decoding)
    lossless: bool   # claims the full model's greedy output: the report checks it against vanilla's
    llm: llama_cpp.Llama
    options: dict = field(default_factory=dict)  # what it was built with, for the report
    drafter: str = ""  # specee: where its candidates come from ("ngram", "draft", "head" or "head+lookup");
                       # spec: its chain drafter
    draft_llm: Optional[llama_cpp.Llama] = None  # a draft model: its prompt processing is prompt time

    def prefill_draft(self, prompt_tokens: Sequence[int]) -> None:
        """Process the prompt in the draft model too, as llama.cpp's speculative example does up
        front, so that decode time holds only decoding."""
        if self.draft_llm is not None:
            sync_draft_context(self.draft_llm, prompt_tokens)

    def close(self) -> None:
        if self.kind == "speculative" and self.draft_llm is not None:
            self.draft_llm.close()  # a specee Llama closes the draft model it loaded itself
        self.llm.close()


@dataclass
class BenchModels:
    """The model files and runtime settings every configuration shares."""

    model: str
    predictors: Sequence[str] = ("auto",)  # "auto": the file shipped for the model; none: no specee configs
    draft: Optional[str] = None
    n_ctx: int = 2048
    n_threads: int = 2
    n_gpu_layers: int = 0
    offload_first: bool = False

    def llama_kwargs(self) -> dict:
        return dict(n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers, verbose=False)


def resolve_predictor(predictor: str, model: str, weights) -> str:
    """The predictor file to use: `predictor`, or for "auto" the one shipped for the model."""
    if predictor != "auto":
        return predictor
    path = shipped_predictor_path(weights)
    if path is None:
        raise SpeceeError(f"no predictor is shipped for {model}: make one with 'specee-pc calibrate' "
                          "and pass it with --predictor, or leave the specee configurations out (--policies none)")
    return path


def unmatched_suffix(threshold: float, threshold_unmatched: Optional[float]) -> str:
    """What names and plot labels add for an unmatched threshold of its own (nothing when it is the threshold)."""
    return "" if threshold_unmatched in (None, threshold) else f" unmatched {threshold_unmatched:.2f}"


def specee_name(policy: str, drafter: str, rule: str, threshold: float,
                threshold_unmatched: Optional[float] = None) -> str:
    return f"specee {policy} {drafter} {rule} {threshold:.2f}{unmatched_suffix(threshold, threshold_unmatched)}"


def file_drafters(predictor, models: BenchModels) -> List[str]:
    """The drafters a predictor file is benchmarked with: the candidates it was trained on (its
    draft head, alone or merged with prompt lookup, or prompt lookup), and the draft model when
    one is given."""
    if predictor.head is not None:
        return [predictor.trained_drafter()]
    return ["ngram"] + (["draft"] if models.draft else [])


def build_configs(models: BenchModels, **choices) -> List[BenchConfig]:
    """vanilla, the speculative baselines that apply, and specee for every policy x drafter x
    rule x threshold (None: the predictor file's threshold) x unmatched threshold (None: the
    threshold); the draft-model variants need
    models.draft. On an error, what was already loaded is closed."""
    configs: List[BenchConfig] = []
    try:
        _add_configs(configs, models, **choices)
    except BaseException:
        close_configs(configs)
        raise
    return configs


def _add_configs(configs: List[BenchConfig], models: BenchModels, *, baselines: Sequence[str] = BASELINES,
                 policies: Sequence[str] = POLICIES, rules: Sequence[str] = ("verify",),
                 thresholds: Sequence[Optional[float]] = (None,),
                 thresholds_unmatched: Sequence[Optional[float]] = (None,),
                 lookup_tokens: Sequence[int] = LOOKUP_TOKENS, draft_tokens: int = 4,
                 offline_layers: Optional[Sequence[int]] = None, online_offsets: Optional[Sequence[int]] = None,
                 speculate: Sequence[str] = (), draft_max: int = 4) -> None:
    common = models.llama_kwargs()
    # speculative decoding keeps every logit; llama_cpp sizes that buffer by logits_all, not by
    # draft_model, so prompts longer than n_batch overflow it unless logits_all is given too
    configs.append(BenchConfig("vanilla", "vanilla", True, llama_cpp.Llama(models.model, **common)))
    n_vocab = configs[0].llm.n_vocab()
    for n in dict.fromkeys(lookup_tokens if "lookup" in baselines else ()):
        configs.append(BenchConfig(
            f"llama-cpp-python lookup {n}", "speculative", True,
            llama_cpp.Llama(models.model, **common, logits_all=True,
                            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=n)),
            {"drafter": "prompt lookup", "num_pred_tokens": n}))
    if "draft" in baselines and models.draft:
        drafter = GreedyDraftModel(models.draft, target_vocab=n_vocab, num_pred_tokens=draft_tokens,
                                   n_ctx=models.n_ctx, n_threads=models.n_threads, n_gpu_layers=models.n_gpu_layers)
        configs.append(BenchConfig("llama-cpp-python draft model", "speculative", True,
                                   llama_cpp.Llama(models.model, **common, logits_all=True, draft_model=drafter),
                                   {"drafter": models.draft, "num_pred_tokens": draft_tokens},
                                   draft_llm=drafter.model))
    weights = open_weights(models.model)
    predictor = models.predictors[0] if models.predictors else "auto"
    path = shipped_predictor_path(weights) if predictor == "auto" else predictor
    for drafter in dict.fromkeys(speculate):
        chain = models.draft if drafter == "draft" else drafter
        if drafter == "draft" and not models.draft:
            raise SpeceeError("speculation with 'draft' needs --draft MODEL.gguf")
        llm = Llama(models.model, **common, speculate=chain, predictor=path, draft_max=draft_max)
        configs.append(BenchConfig(f"spec {drafter}", "spec", True, llm,
                                   {"speculate": drafter, "drafter": llm.speculation_drafter.name,
                                    "predictor": path, "draft_max": draft_max,
                                    "batch_ms": list(llm.speculation_control.costs.ms),
                                    "batch_ms_source": llm.speculation_control.costs.source},
                                   drafter, llm.speculation_drafter.model if drafter == "draft" else None))
    if not policies or not models.predictors:
        return
    pairs = []  # (predictor path, drafter, its threshold), one file per drafter
    for path in dict.fromkeys(resolve_predictor(p, models.model, weights) for p in models.predictors):
        predictor = read_predictor_file(path)
        predictor.check_model(weights, path, models.model)
        for drafter in file_drafters(predictor, models):
            if any(drafter == d for _, d, _ in pairs):
                raise SpeceeError(f"two predictor files for the {drafter} drafter: give one")
            pairs.append((path, drafter, predictor.threshold))
    for policy in dict.fromkeys(policies):
        for predictor_path, drafter, file_threshold in pairs:
            for rule in dict.fromkeys(rules):
                for threshold, unmatched in dict.fromkeys(
                        (t, t if u is None else u) for t in (file_threshold if t is None else t for t in thresholds)
                        for u in thresholds_unmatched):
                    llm = Llama(models.model, **common, offload_first_layers=models.offload_first,
                                predictor=predictor_path, exit_rule=rule, exit_threshold=threshold,
                                exit_threshold_unmatched=unmatched, kv_policy=policy,
                                drafter=models.draft if drafter == "draft" else drafter,
                                offline_layers=offline_layers, online_offsets=online_offsets)
                    configs.append(BenchConfig(
                        specee_name(policy, drafter, rule, threshold, unmatched), "specee", policy == "exact", llm,
                        {"kv_policy": policy, "drafter": drafter, "exit_rule": rule, "threshold": threshold,
                         "threshold_unmatched": unmatched, "predictor": predictor_path,
                         "offline_layers": offline_layers, "online_offsets": online_offsets}, drafter,
                        llm.exit_drafter.model if drafter == "draft" else None))


def close_configs(configs: Sequence[BenchConfig]) -> None:
    for config in configs:
        config.close()
