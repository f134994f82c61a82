"""Speculative decoding on the real model: chains, lossless verification (greedy and sampled),
the cost model's choices and cache, and the decode loop's state when a caller stops early."""
import collections
import math

import numpy as np
import pytest
from conftest import N_THREADS

import llama_cpp
import specee_pc
from specee_pc import _native, decode
from specee_pc.control import (AcceptanceTracker, BatchCosts, SpeculationControl, best_length, expected_tokens,
                               measure_batch_costs)
from specee_pc.replay import ReplayDrafts

# repeats itself, so that prompt lookup drafts long chains
REPETITIVE = ("Count: one two three four five six seven eight nine ten. Again: one two three four five six seven "
              "eight nine ten. Again:")
PROMPT = "Write a detailed essay about the history of the Roman Empire."


def speculative(model_path, speculate, **options):
    return specee_pc.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, speculate=speculate, **options)


def generate(model, tokens, n, **sampling):
    sampling.setdefault("temp", 0.0)
    return [t for _, t in zip(range(n), model.generate(tokens, **sampling))]


def replay_of(model_path, llm, tokens, n, **sampling):
    """llama-cpp-python's own speculative decoding of the very batches llm verified (SPEC §3: the
    only bit-exact reference for batched decoding)."""
    reference = llama_cpp.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, logits_all=True,
                                draft_model=ReplayDrafts(llm.speculation_stats.rounds_at), seed=llm._seed)
    out = generate(reference, tokens, n, **sampling)
    reference.close()
    return out


# ---------------------------------------------------------------- drafters


def lookup_continuation_reference(tokens, min_ngram, max_ngram, max_len):
    n = len(tokens)
    for size in range(max_ngram, min_ngram - 1, -1):
        if size >= n:
            continue
        suffix = tokens[n - size:]
        for j in range(n - 2, size - 2, -1):  # occurrences ending at j, latest first
            if tokens[j - size + 1:j + 1] == suffix:
                return tokens[j + 1:j + 1 + max_len], size
    return [], 0


def test_lookup_continuation_follows_the_latest_longest_match():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, 4, size=int(rng.integers(2, 40))).tolist()
        got = _native.lookup_continuation(np.asarray(tokens, np.int32), 1, 3, 1024, 4)
        assert got == lookup_continuation_reference(tokens, 1, 3, 4), tokens
    tokens = np.asarray([5, 6, 7, 8, 9, 5, 6, 7], np.int32)
    assert _native.lookup_continuation(tokens, 1, 3, 1024, 3) == ([8, 9, 5], 3)
    assert _native.lookup_continuation(tokens, 4, 4, 1024, 3) == ([], 0)  # no 4-gram repeats
    with pytest.raises(ValueError):
        _native.lookup_continuation(tokens, 0, 3, 1024, 3)


def test_head_chain_starts_with_its_proposal_and_leaves_the_head_as_it_was(model_path):
    llm = speculative(model_path, "head")
    head = llm.speculation_drafter.head
    context = np.asarray(llm.tokenize(PROMPT.encode()), np.int32)
    llm.eval(context[:-1].tolist())  # features of every position before the last token
    before = head.propose(context, 4)
    top = float(np.max(softmax(head.logits())))
    tokens, probs = head.draft(context, 4)
    assert len(tokens) == 4 and tokens[0] == before[0] and math.isclose(probs[0], top, rel_tol=1e-4)
    assert all(0 < p <= 1 for p in probs)
    assert head.propose(context, 4) == before  # the chain's rows and predicted features are gone
    assert head.draft(context[:1], 3) == ([], [])  # nothing to draft from
    llm.close()


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


# ---------------------------------------------------------------- lossless verification


@pytest.mark.parametrize("speculate", ["lookup", "head", "head+lookup"])
def test_greedy_speculation_equals_decoding_the_same_batches(model_path, reference, speculate):
    llm = speculative(model_path, speculate, draft_length=3)  # verify 3 drafts whenever there are 3
    for prompt in (REPETITIVE, PROMPT):
        tokens = llm.tokenize(prompt.encode())
        ours = generate(llm, tokens, 48)
        stats = llm.speculation_stats
        assert stats.drafted > 0 and stats.tokens == len(ours) - 1
        assert ours == replay_of(model_path, llm, tokens, 48)
        assert_full_models(reference, tokens, ours)
    if speculate == "lookup":  # the repetitive prompt's continuation is drafted and accepted
        assert stats.accepted > 0
    llm.close()


def assert_full_models(reference, tokens, ours):
    """ours is llama-cpp-python's one-token greedy output, but where batch-shape numerics flip a
    near-tie: there the full model's logit gap must be small."""
    theirs = generate(reference, tokens, len(ours))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is not None:
        row = next_logits(reference, tokens + theirs[:first])
        gap = float(row[theirs[first]] - row[ours[first]])
        assert gap < 0.5, f"token {first} differs where the full model's logit gap is {gap:.3f}"


def next_logits(model, tokens):
    model.reset()
    model.eval(list(tokens))
    return np.ctypeslib.as_array(model._ctx.get_logits_ith(-1), shape=(model.n_vocab(),)).copy()


def test_seeded_sampling_equals_decoding_the_same_batches(model_path):
    """One sampler call per emitted token, on the target's own rows: with the same seed and the same
    batches, llama-cpp-python samples the very same tokens."""
    llm = speculative(model_path, "lookup", draft_length=4, seed=42)
    tokens = llm.tokenize(REPETITIVE.encode())
    sampling = dict(temp=0.9, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)
    ours = generate(llm, tokens, 40, **sampling)
    assert llm.speculation_stats.drafted > 0
    assert ours == replay_of(model_path, llm, tokens, 40, **sampling)
    llm.close()


SAMPLED = "Repeat after me: red green blue, red green blue, red green blue, red green"


def token_frequencies(model, tokens, seeds, position):
    counts = collections.Counter()
    for seed in seeds:
        model.set_seed(seed)
        model.reset()
        out = generate(model, tokens, position + 1, temp=1.5, top_k=20, top_p=1.0, min_p=0.0)
        counts[tuple(out[1:position + 1])] += 1
    return counts


def chi_square_two_sample(a: collections.Counter, b: collections.Counter, min_count: int = 8):
    """Two-sample chi-square statistic over categories with at least min_count draws (the rest pooled),
    and its 0.1% critical value (Wilson-Hilferty)."""
    na, nb = sum(a.values()), sum(b.values())
    keep = [k for k in set(a) | set(b) if a[k] + b[k] >= min_count]
    cells = [(a[k], b[k]) for k in keep]
    cells.append((na - sum(x for x, _ in cells), nb - sum(y for _, y in cells)))
    cells = [(x, y) for x, y in cells if x + y > 0]
    stat = sum((math.sqrt(nb / na) * x - math.sqrt(na / nb) * y) ** 2 / (x + y) for x, y in cells)
    dof = len(cells) - 1
    z = 3.09  # one-sided 0.1%
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat, critical


def test_sampled_tokens_follow_the_full_models_distribution(model_path, reference, monkeypatch):
    """The second and third sampled tokens (drafted by lookup and verified) are distributed as
    llama-cpp-python's, over disjoint seeds; a verifier that keeps a draft the target merely ranks
    high fails the same test."""
    tokens = reference.tokenize(SAMPLED.encode())
    theirs = token_frequencies(reference, tokens, range(0, 150), 2)
    llm = speculative(model_path, "lookup", draft_length=3)
    ours = token_frequencies(llm, tokens, range(1000, 1150), 2)
    assert llm.speculation_stats.drafted > 0
    stat, critical = chi_square_two_sample(ours, theirs)
    assert stat < critical, (stat, critical, ours.most_common(5), theirs.most_common(5))

    def keeps_likely_drafts(target, row, draft):
        sampled = target.sample(row)
        logits = np.ctypeslib.as_array(target.llm._ctx.get_logits_ith(row), shape=(target.llm.n_vocab(),))
        return draft if draft is not None and draft in np.argsort(logits)[-5:] else sampled

    monkeypatch.setattr(decode, "verify_row", keeps_likely_drafts)
    wrong = token_frequencies(llm, tokens, range(2000, 2150), 2)
    stat, critical = chi_square_two_sample(wrong, theirs)
    assert stat > critical, (stat, critical)
    llm.close()


def test_stopping_early_leaves_the_cache_consistent(model_path, reference):
    """A caller may stop at any token, mid-round: the next generations, reusing the cached prefix
    (no reset in between), are still the full model's."""
    llm = speculative(model_path, "lookup", draft_length=4)
    tokens = llm.tokenize(REPETITIVE.encode())
    first = generate(llm, tokens, 7)  # stops inside a round of 4 drafts
    assert llm.n_tokens == len(tokens) + 6
    assert_full_models(reference, tokens, generate(llm, tokens, 5))
    follow = tokens + first
    assert_full_models(reference, follow, generate(llm, follow, 20))
    llm.close()


def test_completion_api_streams_and_stops_as_llama_cpp(llm, reference, model_path):
    spec = speculative(model_path, "auto")
    kwargs = dict(prompt=REPETITIVE, max_tokens=40, temperature=0.0, stop=["eight"])
    ours = "".join(c["choices"][0]["text"] for c in spec.create_completion(stream=True, **kwargs))
    theirs = reference.create_completion(**kwargs)["choices"][0]["text"]
    assert ours == theirs and "eight" not in ours
    chat = spec.create_chat_completion(messages=[{"role": "user", "content": "Name three planets."}],
                                       temperature=0.0, max_tokens=24)
    assert chat["choices"][0]["message"]["content"] and chat["usage"]["completion_tokens"] <= 24
    spec.close()


# ---------------------------------------------------------------- the cost model


def test_the_controller_drafts_only_what_pays():
    costs = BatchCosts([10.0, 16.0, 21.0, 22.4, 25.0])  # c(2) = 1.6, c(4) = 2.24, c(5) = 2.5
    assert expected_tokens([0.5, 0.5]) == [1.0, 1.5, 1.75]
    assert best_length([0.5, 0.5, 0.5, 0.5], costs) == 0          # 1.94 tokens for 2.5 steps at best
    assert best_length([0.95, 0.95, 0.95, 0.95], costs) == 4      # 4.5 tokens for 2.5 steps
    assert best_length([0.95, 0.95, 0.95, 0.3], costs) == 3       # the fourth adds 0.26 tokens for 0.26 steps
    assert best_length([0.95, 0.1, 0.95], costs) == 1
    assert best_length([0.99] * 8, costs) == 4                     # never past the measured batches
    assert best_length([0.95, 0.95, 0.95, 0.95], costs, draft_ms=100.0) == 0
    free = BatchCosts([10.0, 10.5, 11.0, 11.5, 12.0])  # a GPU: extra batch tokens nearly free
    assert best_length([0.6, 0.6, 0.6, 0.6], free) == 4


def test_batch_costs_follow_a_growing_context_as_a_whole():
    """Plain steps dearer at a long context make every batch dearer, not drafting look cheaper."""
    costs = BatchCosts([10.0, 20.0, 25.0])
    for _ in range(200):
        costs.observe(1, 15.0)
    assert costs(1) == pytest.approx(15.0, rel=0.01) and costs(3) == pytest.approx(37.5, rel=0.01)
    assert costs.relative() == [1.0, 2.0, 2.5]
    costs.observe(2, 1e6)  # one outlier moves it little
    assert costs(1) < 16.5


def test_drafts_are_scored_against_what_decoding_emits():
    control = SpeculationControl(BatchCosts([10.0, 16.0, 21.0]))
    control.drafted(3, "lookup", [7, 8, 9], [3.0, 3.0, 3.0])
    control.score([0, 1, 2, 3, 7, 8])        # 7, 8 held, 9 not known yet
    assert control._pending
    control.score([0, 1, 2, 3, 7, 8, 5])     # 9 rejected
    tracker = control.tracker
    fresh = AcceptanceTracker()
    assert tracker.estimate("lookup", 1, 3.0) > fresh.estimate("lookup", 1, 3.0)
    assert tracker.estimate("lookup", 3, 3.0) < fresh.estimate("lookup", 3, 3.0)
    assert not control._pending


def test_batch_costs_are_measured_once_and_cached(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = speculative(model_path, "lookup", draft_max=2)
    costs = first.speculation_control.costs
    assert costs.source == "measured" and costs.k_max == 3 and all(b >= a > 0 for a, b in zip(costs.ms, costs.ms[1:]))
    first.close()
    again = speculative(model_path, "lookup", draft_max=2)
    cached = again.speculation_control.costs
    assert cached.source == "cache" and cached.ms == pytest.approx(costs.ms, abs=1e-3)
    again.close()
    (tmp_path / "specee-pc" / "batch-costs.json").write_text("{not json")  # a broken cache is measured anew
    broken = speculative(model_path, "lookup", draft_max=2)
    assert broken.speculation_control.costs.source == "measured"
    broken.close()


def test_measurement_is_monotonic_and_within_budget():
    import time

    def decode_batch(k):
        time.sleep(0.001 * (3 - k % 3))  # a noisy machine: bigger batches timed faster

    ms = measure_batch_costs(decode_batch, lambda: None, 4, budget_s=0.2)
    assert len(ms) == 4 and all(b >= a for a, b in zip(ms, ms[1:]))


def test_bad_speculation_options_are_one_line_errors(model_path):
    for options, message in (({"draft_max": 0}, "draft_max"), ({"draft_length": 9}, "draft_length")):
        with pytest.raises(ValueError, match=message):
            speculative(model_path, "lookup", **options)
    with pytest.raises(ValueError, match="unknown speculation drafter"):
        speculative(model_path, "psychic")
