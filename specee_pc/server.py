"""An OpenAI-compatible HTTP server: llama-cpp-python's (`llama_cpp.server`, its `[server]` extra)
serving one specee_pc.Llama.

Its request types, completion endpoints, locks, API-key check and error formats are
llama-cpp-python's. What this module adds:
- the model: one loaded Llama under one name; another name in a request is a 404, where
  llama-cpp-python would silently answer with its default model;
- streams that start only once the first chunk exists, so that a prompt longer than the context
  or an unknown model is a 4xx JSON error as without streaming, not a broken 200 stream;
- malformed JSON and out-of-range fields as OpenAI-style 400 errors (llama-cpp-python's route
  class turns them into 500s);
- `GET /extras/speculation`: speculation's (or early exit's) statistics of the last requests.
Requests are served one at a time (llama-cpp-python's locks): concurrent clients queue, none
interrupts another. Every call into the model runs on one thread of its own, the one that loaded
it (`ModelThread`): llama.cpp's OpenMP workers belong to the thread that first computed with
them, and a model driven from a pool's changing threads decodes at about half speed.
"""
import asyncio
import collections
import contextlib
import datetime
import functools
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, Dict, Optional

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from llama_cpp.server import app as llama_server
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.settings import ServerSettings
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from sse_starlette.sse import EventSourceResponse

from . import __version__
from .llama import Llama

# what llama-cpp-python's endpoints leave out of the arguments they pass to the model
EXCLUDED_FIELDS = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}


class ModelNotFound(LookupError):
    pass


class ModelThread:
    """The one thread that loads the model and runs every call into it."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="specee-model")

    def run(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the model's thread, waiting for it here."""
        return self._executor.submit(fn, *args, **kwargs).result()

    async def call(self, fn: Callable, *args, **kwargs):
        """The same, awaited; a cancelled caller stops waiting, the call itself runs to its end
        before the thread takes the next one."""
        return await asyncio.wrap_future(self._executor.submit(functools.partial(fn, *args, **kwargs)))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class OneModel:
    """llama_cpp.server's model proxy (LlamaProxy's interface) for one loaded Llama."""

    def __init__(self, llm: Llama, alias: str):
        self.llm, self.alias = llm, alias

    def __call__(self, model: Optional[str] = None) -> Llama:
        if model not in (None, self.alias):
            raise ModelNotFound(f"The model `{model}` does not exist: this server serves `{self.alias}`")
        return self.llm

    def __iter__(self):
        yield self.alias


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIErrorRoute(RouteErrorHandler):
    """llama-cpp-python's route class (its messages for a prompt longer than the context), with
    request errors answered as OpenAI answers them."""

    def get_route_handler(self):
        handler = super(RouteErrorHandler, self).get_route_handler()  # APIRoute's, unwrapped

        async def route(request: Request):
            try:
                return await handler(request)
            except HTTPException:
                raise
            except RequestValidationError as e:
                return validation_error(e)
            except ModelNotFound as e:
                return JSONResponse(error_body(str(e), param="model", code="model_not_found"), status_code=404)
            except Exception as e:
                if isinstance(e, ValueError) and not any(p.search(str(e)) for p in self.pattern_and_formatters):
                    # llama-cpp-python's ValueErrors are its arguments' (a grammar, a stop list):
                    # the request's fault, where its route class answers 500 with a traceback
                    return JSONResponse(error_body(str(e)), status_code=400)
                body = await parsed_body(request)
                status, error = self.error_message_wrapper(error=e, body=body)
                return JSONResponse({"error": error}, status_code=status)
        return route


async def parsed_body(request: Request):
    try:
        data = await request.json()
        return CreateChatCompletionRequest(**data) if "messages" in data else CreateCompletionRequest(**data)
    except Exception:
        return None


def validation_error(e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
        where = []
    elif where:
        message = f"{'.'.join(where)}: {message}"
    return JSONResponse(error_body(message, param=".".join(where) or None), status_code=400)


class RequestLog:
    """Statistics of the last generations, newest last."""

    def __init__(self, size: int):
        self.entries: Deque[dict] = collections.deque(maxlen=size)

    def record(self, llm: Llama) -> None:
        stats = llm.last_stats
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                 "prompt_seconds": round(stats.prompt_seconds, 4),
                 "decode_tokens_per_second": round(stats.decode_tokens_per_second, 2)}
        spec = llm.speculation_stats if llm.speculation_control is not None else None
        if spec is not None:
            entry["speculation"] = {
                "rounds": spec.rounds, "drafted": spec.drafted, "accepted": spec.accepted,
                "acceptance": round(spec.acceptance, 4), "tokens_per_round": round(spec.tokens_per_round, 3),
                "acceptance_by_position": [round(a, 4) for a in spec.acceptance_by_position()],
                "rounds_by_drafter": dict(spec.sources), "draft_ms": round(spec.draft_ms, 2),
                "verify_ms": round(spec.verify_ms, 2)}
        exits = llm.exit_stats
        if exits is not None:
            entry["early_exit"] = {"steps": exits.steps, "exits": exits.exits, "exit_ratio": round(exits.exit_ratio, 4),
                                   "mean_layers": round(exits.mean_layers, 2), "n_layer": exits.n_layer}
        self.entries.append(entry)

    def report(self, llm: Llama) -> dict:
        entries = list(self.entries)
        rounds = [e["speculation"] for e in entries if "speculation" in e]
        drafted = sum(r["drafted"] for r in rounds)
        summary = {"requests": len(entries)}
        if rounds:
            summary.update(rounds=sum(r["rounds"] for r in rounds), drafted=drafted,
                           accepted=sum(r["accepted"] for r in rounds),
                           acceptance=round(sum(r["accepted"] for r in rounds) / drafted, 4) if drafted else 0.0)
        options = {k: v for k, v in vars(llm.options).items() if isinstance(v, (str, int, float, tuple, type(None)))}
        return {"object": "specee.stats", "mode": llm.options.mode, "options": options, "summary": summary,
                "requests": entries}


def create_app(llm: Llama, alias: str, model_thread: ModelThread, *, history: int = 32,
               api_key: Optional[str] = None) -> FastAPI:
    """The app serving llm, which model_thread loaded, as model `alias`; keeps the statistics of the
    last `history` requests."""
    settings = ServerSettings(api_key=api_key, interrupt_requests=False)
    llama_server.set_server_settings(settings)
    llama_server._llama_proxy = OneModel(llm, alias)  # the one place its module state is set
    log = RequestLog(history)
    llm.on_generation_end = log.record
    app = FastAPI(title="specee-pc", version=__version__)
    app.add_exception_handler(RequestValidationError, lambda request, e: validation_error(e))
    app.add_exception_handler(HTTPException, lambda request, e: JSONResponse(
        error_body(str(e.detail), kind="authentication_error" if e.status_code == 401 else "invalid_request_error"),
        status_code=e.status_code, headers=getattr(e, "headers", None)))
    app.include_router(routes(log, llm, alias, model_thread))
    return app


def routes(log: RequestLog, llm: Llama, alias: str, model_thread: ModelThread) -> APIRouter:
    router = APIRouter(route_class=OpenAIErrorRoute, dependencies=[Depends(llama_server.authenticate)])

    @router.post("/v1/completions")
    async def completions(request: Request, body: CreateCompletionRequest):
        body.model = body.model or alias  # answers name the model as /v1/models does
        if isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise RequestValidationError([{"loc": ("body", "prompt"), "msg": "one prompt per request",
                                               "type": "value_error"}])
            body.prompt = body.prompt[0] if body.prompt else ""
        return await answer(body, Llama.__call__, model_thread)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: CreateChatCompletionRequest):
        body.model = body.model or alias
        return await answer(body, Llama.create_chat_completion, model_thread)

    router.add_api_route("/v1/models", llama_server.get_models, methods=["GET"])
    router.add_api_route("/extras/tokenize", llama_server.tokenize, methods=["POST"])
    router.add_api_route("/extras/tokenize/count", llama_server.count_query_tokens, methods=["POST"])
    router.add_api_route("/extras/detokenize", llama_server.detokenize, methods=["POST"])

    @router.get("/extras/speculation")
    async def speculation() -> Dict:  # without the model's lock: it answers during a generation
        return log.report(llm)

    return router


class HeldStream(EventSourceResponse):
    """A server-sent-events response that releases the model when it has been sent. The lock is
    its request's task's, which runs the response; the events are sent by a child task."""

    def __init__(self, events, release):
        super().__init__(events, sep="\n")
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.release()


async def answer(body, call, model_thread: ModelThread):
    """call(llm, **request) on the model's thread, holding the model as llama-cpp-python's endpoints
    do; a streamed answer starts only once its first chunk exists, so that errors before it
    (unknown model, a prompt too long) are answered as errors, and holds the model until its
    generation has stopped."""
    kwargs = body.model_dump(exclude=EXCLUDED_FIELDS)
    if not body.stream:
        async with contextlib.asynccontextmanager(llama_server.get_llama_proxy)() as proxy:
            llm = llama_server.prepare_request_resources(body, proxy, body.model, kwargs)
            return await model_thread.call(call, llm, **kwargs)
    held = contextlib.asynccontextmanager(llama_server.get_llama_proxy)()
    proxy = await held.__aenter__()
    try:
        llm = llama_server.prepare_request_resources(body, proxy, body.model, kwargs)
        chunks = await model_thread.call(call, llm, **kwargs)
        first = await model_thread.call(next, chunks, None)
    except BaseException:
        await held.__aexit__(*sys.exc_info())
        raise

    async def events():
        try:
            chunk = first
            while chunk is not None:
                yield {"data": json.dumps(chunk)}
                chunk = await model_thread.call(next, chunks, None)
            yield {"data": "[DONE]"}
        finally:
            with anyio.CancelScope(shield=True):
                await model_thread.call(chunks.close)

    return HeldStream(events(), lambda: held.__aexit__(None, None, None))
