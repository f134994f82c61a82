"""The speculative decode loop, top to bottom: prefill, then rounds of
draft -> verify in one batch -> accept -> roll back -> feed the drafter.

Lossless for any sampler: each verified position is sampled from the target's own logits with
the user's sampler (greedy included) and a draft is kept only while it equals that sample, so
every emitted token is the one plain decoding would sample there, one sampler call per token.
"""
import time
from typing import Callable, Generator, Optional, Sequence

from .chains import ChainDrafter, Draft
from .control import SpeculationControl, SpeculationStats
from .runtime import Target


def prefill(target: Target, prompt: Sequence[int], stats: SpeculationStats) -> int:
    """Decode the prompt (past the cached prefix) and sample the first token."""
    kept = target.keep_prefix(prompt)
    stats.prefill_ms += target.prefill(prompt[kept:])
    stats.prefill_tokens += len(prompt) - kept
    return target.sample(-1)


def draft_round(target: Target, drafter: Optional[ChainDrafter], control: SpeculationControl, token: int) -> Draft:
    """The drafts worth verifying after token (at position n_tokens), within the context."""
    if drafter is None:
        return Draft("none")
    context = target.context(token)
    control.score(context)
    drafts = drafter.draft(context, control)
    for d in drafts:
        control.drafted(len(context) - 1, d.source, d.tokens, d.confidence)
    chosen, g = control.choose(drafts)
    g = min(g, target.n_ctx - len(context))  # the batch's last position must fit the context
    if chosen < 0 or g <= 0:
        return Draft("none")
    d = drafts[chosen]
    return Draft(d.source, d.tokens[:g], d.confidence[:g])


def verify_row(target: Target, row: int, draft: Optional[int]) -> int:
    """The token the target emits after row `row` of the batch: its own sample, whatever the draft."""
    return target.sample(row)


def speculative_generate(target: Target, drafter: Optional[ChainDrafter], control: SpeculationControl,
                         prompt: Sequence[int], stats: SpeculationStats,
                         stop: Optional[Callable] = None) -> Generator[int, None, None]:
    """Tokens after prompt, as the target's sampler draws them; stats fill in as rounds end.
    stop: llama_cpp stopping criteria, asked after each sample (True ends the generation).

    Whenever a token is yielded, positions < n_tokens hold every earlier token (the yielded one
    is not decoded yet), as llama_cpp.Llama.generate leaves them: the caller may stop at any yield."""
    control.begin()
    token = prefill(target, prompt, stats)
    if stop is not None and target.stops(stop, -1):
        return
    while True:
        yield token
        # draft
        start = time.perf_counter()
        draft = draft_round(target, drafter, control, token)
        stats.draft_ms += (time.perf_counter() - start) * 1e3
        chain = draft.tokens
        # verify: the token and its drafts in one batch, every row's logits
        n = target.n_tokens
        batch_ms = target.decode([token] + chain)
        stats.verify_ms += batch_ms
        stats.rounds_at.append((n, list(chain)))
        # accept: sample row by row while the sample is the draft
        accepted = 0
        for i in range(len(chain) + 1):
            sampled = verify_row(target, i, chain[i] if i < len(chain) else None)
            target.set_n_tokens(n + i + 1)
            stats.tokens += 1
            if stop is not None and target.stops(stop, i):
                return
            if i == len(chain) or sampled != chain[i]:
                break
            accepted += 1
            yield sampled
        # roll back: positions after the last accepted draft leave the cache (n_tokens says so;
        # the next batch removes them); the drafter rolls back with them when it is fed
        control.observe_round(len(chain) + 1, batch_ms)
        stats.record_round(draft.source, chain, accepted)
        token = sampled
