"""What does serving over HTTP cost? `specee-pc serve` against `specee_pc.Llama` in this process,
and llama-cpp-python's own server (`python -m llama_cpp.server`, plain decoding) against
`llama_cpp.Llama`: the same prompts and order, alternating prompt by prompt (the idle ones take
no CPU).

Each answers the held-out chat prompts greedily (repeat_penalty 1.0, as the Python API's
default); reported: end-to-end seconds per answer as each client sees it (prompt processing
included), the median ratios, and whether the answers are the same.

    python research/server_overhead.py [MODEL.gguf] --per-set 2 -n 128 -t 2
"""
import argparse
import os
import socket
import subprocess
import sys
import time

import llama_cpp
import numpy as np
from openai import OpenAI

import specee_pc
from specee_pc.default_model import default_model_path
from specee_pc.prompt_sets import SETS, first_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--per-set", type=int, default=2)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    args = ap.parse_args()
    model = args.model or default_model_path()
    prompts = first_prompts(list(SETS), args.per_set)
    servers, clients = [], {}
    try:
        for name, command in (("specee", ["-m", "specee_pc.cli", "serve", model]),
                              ("llama_cpp", ["-m", "llama_cpp.server", "--model", model, "--n_ctx", "2048"])):
            port = free_port()
            threads = ["-t", str(args.t)] if name == "specee" else ["--n_threads", str(args.t)]
            servers.append(subprocess.Popen([sys.executable, *command, "--port", str(port), *threads],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            clients[name] = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
        aliases = {}
        for name, client in clients.items():
            for _ in range(240):
                try:
                    aliases[name] = client.models.list().data[0].id
                    break
                except Exception:
                    time.sleep(0.5)
        local = {"specee": specee_pc.Llama(model, n_ctx=2048, n_threads=args.t, verbose=False, speculate="auto"),
                 "llama_cpp": llama_cpp.Llama(model, n_ctx=2048, n_threads=args.t, verbose=False)}
        times = {key: [] for key in ("specee http", "specee python", "llama_cpp http", "llama_cpp python")}
        same = 0
        for p in prompts:
            messages = [{"role": "user", "content": p.text}]
            texts = {}
            for name in ("specee", "llama_cpp"):
                start = time.perf_counter()
                reply = clients[name].chat.completions.create(model=aliases[name], messages=messages,
                                                              max_tokens=args.n, temperature=0,
                                                              extra_body={"repeat_penalty": 1.0})
                times[f"{name} http"].append(time.perf_counter() - start)
                start = time.perf_counter()
                out = local[name].create_chat_completion(messages=messages, max_tokens=args.n, temperature=0)
                times[f"{name} python"].append(time.perf_counter() - start)
                texts[name] = (reply.choices[0].message.content, out["choices"][0]["message"]["content"])
            same += texts["specee"][0] == texts["specee"][1]
            print(f"{p.name:14s} " + "  ".join(f"{k} {v[-1]:6.2f} s" for k, v in times.items()), flush=True)
        for name in ("specee", "llama_cpp"):
            ratios = np.array(times[f"{name} http"]) / np.array(times[f"{name} python"])
            print(f"{name} server: median http/python time {np.median(ratios):.3f} "
                  f"(range {ratios.min():.3f}-{ratios.max():.3f})")
        print(f"specee serve against llama_cpp.server: median time ratio "
              f"{np.median(np.array(times['specee http']) / np.array(times['llama_cpp http'])):.3f}; "
              f"specee http answers equal to its Python API's: {same}/{len(prompts)}; "
              f"model {os.path.basename(model)}, {args.t} threads")
    finally:
        for server in servers:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
