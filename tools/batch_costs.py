"""c(k) = B(k) / B(1), the cost of a decode batch of k tokens against one, on this machine:
plain llama-cpp-python with every row's logits and with the last row's only, and specee-pc's
hooked context as its speculation verifies (docs/speculation.md).

    python tools/batch_costs.py MODEL.gguf [-t THREADS] [-k K_MAX] [--reps N]
"""
import argparse
import statistics
import time

import llama_cpp

import specee_pc

PREFIX = 16  # positions before the timed batch, as the controller measures


def decode_plain(all_logits):
    def decode(llm, tokens, n_past):
        llm._batch.set_batch(tokens, n_past=n_past, logits_all=all_logits)
        llm._ctx.decode(llm._batch)
    return decode


def decode_hooked(llm, tokens, n_past):
    llm._hook.begin_step(n_past + len(tokens) - 1)
    llm._decode_at(n_past, tokens, all_logits=True)


def measure(llm, decode, k_max, reps):
    """Median ms per k over reps interleaved passes, after a prefix."""
    token = max(llm.token_bos(), 0)
    llm.reset()
    llm._ctx.kv_cache_clear()
    decode(llm, [token] * PREFIX, 0)
    times = [[] for _ in range(k_max)]
    for _ in range(reps):
        for k in range(1, k_max + 1):
            llm._ctx.kv_cache_seq_rm(-1, PREFIX, -1)
            start = time.perf_counter()
            decode(llm, [token] * k, PREFIX)
            times[k - 1].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-k", "--k-max", type=int, default=5)
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    rows = []
    plain = llama_cpp.Llama(args.model, n_ctx=512, n_threads=args.threads, verbose=False, logits_all=True)
    rows.append(("llama-cpp-python, every row's logits", measure(plain, decode_plain(True), args.k_max, args.reps)))
    rows.append(("llama-cpp-python, last row's logits", measure(plain, decode_plain(False), args.k_max, args.reps)))
    plain.close()
    ours = specee_pc.Llama(args.model, n_ctx=512, n_threads=args.threads, verbose=False)
    rows.append(("specee-pc hooked, every row's logits", measure(ours, decode_hooked, args.k_max, args.reps)))
    ours.close()
    print("| decode | B(1) ms | " + " | ".join(f"c({k})" for k in range(2, args.k_max + 1)) + " |")
    print("|---|---|" + "---|" * (args.k_max - 1))
    for name, ms in rows:
        print(f"| {name} | {ms[0]:.1f} | " + " | ".join(f"{m / ms[0]:.2f}" for m in ms[1:]) + " |")


if __name__ == "__main__":
    main()
