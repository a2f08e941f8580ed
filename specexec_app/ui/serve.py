"""`specexec serve`: the loaded pipeline behind an OpenAI-compatible HTTP API.

One generation runs at a time (one GPU): requests wait in a bounded FIFO and are answered in
order by one worker thread that owns the pipeline. Handlers talk to the worker through a `Job`:
the worker posts ("text", delta), then ("done", Outcome) or ("error", message) to the job's
asyncio queue (("cancelled", None) to a job dropped before it ran). A handler whose client went
away cancels its job, and the worker closes the engine's generator at its next event (within one
pass). The target's KV cache is kept between
requests, so a conversation resent with one more turn prefills only its new tokens.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from specexec_app.config.settings import DecodeSettings
from specexec_app.core.engine import Done, Notice, Pass, Stats, Text
from specexec_app.errors import UserError
from specexec_app.ui.render import count, draft_text

Log = Callable[[str], None]


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- requests (strict: "0.5" is not a number, "yes" is not a boolean) ----

class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    # Fields we do not use (frequency_penalty, user, ...) are ignored, as OpenAI-style servers do.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None  # one choice per request


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class ApiError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---- stop strings ----

class StopText:
    """Cuts streamed text at the first stop string, also when one spans several deltas: the tail
    that could begin a stop string is held back until the next delta decides it."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        buf = self.held + text
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.held = True, ""
            return buf[:min(cuts)]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# ---- the worker: one generation at a time ----

@dataclass
class Outcome:
    stats: Stats
    reused: int                  # prompt tokens whose KV entries were already cached
    finish_reason: str | None    # OpenAI's: stop, length; None when the client left
    passes_at_cancel: int | None = None
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Job:
    ids: list[int]
    settings: DecodeSettings
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    passes: int = 0
    passes_at_cancel: int | None = None

    def post(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server's loop is gone
            self.cancelled.set()


class Worker:
    """Owns the pipeline; runs queued jobs one at a time, in order, on its own thread."""

    def __init__(self, queue_size: int, log: Log):
        self.queue_size = queue_size
        self.log = log
        self.pipe = None
        self.settings: DecodeSettings | None = None
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.closed = False
        self.history: deque[Outcome] = deque(maxlen=64)  # recent outcomes, newest last
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="specexec-generate", daemon=True)
        self.thread.start()

    def ready(self, pipe, settings: DecodeSettings) -> None:
        self.settings = settings
        self.pipe = pipe  # last: a request that sees the pipe finds the settings too

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", "unavailable_error")
            if len(self.waiting) >= self.queue_size and self.running is not None:
                waiting = count(len(self.waiting), "request")
                raise ApiError(429, f"the server is busy: {waiting} already "
                                    f"{'waits' if len(self.waiting) == 1 else 'wait'} for the model; "
                                    "retry later", "rate_limit_error",
                               code="queue_full")
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            if job.passes_at_cancel is None:
                job.passes_at_cancel = job.passes
            job.cancelled.set()
            if job in self.waiting:  # it never ran: its handler may still wait for word
                self.waiting.remove(job)
                job.post("cancelled", None)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for job in [*self.waiting, *([self.running] if self.running else [])]:
                job.cancelled.set()
                job.post("error", "the server is shutting down")
            self.waiting.clear()
            self.cond.notify()
        # A generation stops at its next pass; exiting under it would abort the process.
        if threading.current_thread() is not self.thread:
            self.thread.join(60)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                job = self.running = self.waiting.popleft()
            try:
                self._run(job)
            except Exception as e:  # the worker outlives a failed request  # noqa: BLE001
                job.post("error", str(e) or type(e).__name__)
            finally:
                with self.cond:
                    self.running = None

    def _run(self, job: Job) -> None:
        pipe = self.pipe
        stats = Stats(prompt_tokens=len(job.ids), reused_prompt_tokens=pipe.target.cached(job.ids))
        cut = StopText(job.stops)
        start = time.perf_counter()
        gen = pipe.generate(job.ids, job.settings)
        reason = None
        try:
            for event in gen:
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                if isinstance(event, Pass):
                    job.passes += 1
                    stats.add(event)
                elif isinstance(event, Text):
                    delta = cut.push(event.text)
                    if delta:
                        job.post("text", delta)
                    if cut.hit:
                        reason = "stop"
                        break
                elif isinstance(event, Notice):
                    self.log(f"note: {event.message}")
                elif isinstance(event, Done):
                    stats = event.stats
        finally:
            gen.close()  # stops the engine here, at a pass boundary (its finally blocks run)
        if reason is None:
            tail = cut.flush()
            if tail:
                job.post("text", tail)
            reason = stats.stop_reason
        else:  # stopped early: the engine's Done never came; the passes' sums stand
            stats.stop_reason = reason
        finish = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(reason)
        out = Outcome(stats, stats.reused_prompt_tokens, finish, job.passes_at_cancel, start, time.perf_counter())
        self.history.append(out)
        job.post("done", out)


# ---- the app ----

def specexec_stats(out: Outcome) -> dict:
    """The vendor field beside `usage`."""
    s = out.stats
    return {"accepted_per_pass": round(s.accepted_per_pass, 3), "pass_ms": round(s.pass_s * 1000, 2),
            "tokens_per_s": round(s.tokens_per_s, 2), "target_passes": s.target_passes,
            "reused_prompt_tokens": out.reused, "prefilled_prompt_tokens": s.prompt_tokens - out.reused,
            "draft_ms": round(s.draft_s * 1000, 1), "wall_ms": round(s.wall_s * 1000, 1),
            "stop_reason": s.stop_reason}


def usage(out: Outcome) -> dict:
    s = out.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens}


def log_detail(out: Outcome) -> str:
    s = out.stats
    return (f"prompt {s.prompt_tokens} ({out.reused} reused) + {count(s.new_tokens, 'token')} in "
            f"{s.wall_s:.2f} s, {s.tokens_per_s:.1f} tok/s, {s.accepted_per_pass:.2f} accepted/pass "
            f"over {count(s.target_passes, 'pass')} ({s.pass_s * 1000:.0f} ms/pass), "
            f"stop: {s.stop_reason}")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    e = errors[0]
    if e.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}")
    # The path the errors share: a union's errors go on with its members' type names.
    loc = list(e.get("loc", ()))
    for other in errors[1:]:
        n = 0
        while n < min(len(loc), len(other.get("loc", ()))) and loc[n] == other["loc"][n]:
            n += 1
        loc = loc[:n]
    param = ".".join(str(x) for x in loc if x != "body") or None
    return ApiError(400, f"{param}: {e['msg']}" if param else e["msg"], param=param,
                    code="invalid_value")


class JsonBodies:
    """A POST body is read as JSON whatever its Content-Type says (`curl -d` sends JSON labelled
    form-encoded), as llama.cpp's server and OpenAI's API read it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class LogRequests:
    """One line per request once its response has ended (a stream too): method, path, status,
    time, and the generation's figures a handler left in the request's state."""

    def __init__(self, app, log: Log):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":  # pollers would flood the log
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0

        async def send_(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            detail = scope.get("state", {}).get("log")
            self.log(f"{time.strftime('%H:%M:%S')} {scope['method']} {scope['path']} "
                     f"{status or 'dropped'} {time.perf_counter() - start:.2f} s"
                     + (f" | {detail}" if detail else ""))


def make_app(pipe=None, settings: DecodeSettings | None = None, model_name: str | None = None,
             queue_size: int = 8, log: Log = log_stderr) -> FastAPI:
    """The HTTP app. Without `pipe` it answers /health "loading" (and generation requests 503)
    until `app.state.worker.ready(pipe, settings)`. `queue_size` requests may wait beside the
    one generating; one more is a 429."""
    if queue_size < 0:
        raise UserError(f"--queue must be 0 or more (got {queue_size})")
    app = FastAPI(title="specexec", docs_url=None, redoc_url=None, openapi_url=None)
    worker = app.state.worker = Worker(queue_size, log)
    if pipe is not None:
        worker.ready(pipe, settings or DecodeSettings())

    def name() -> str:
        return model_name or worker.pipe.target_name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        request.state.log = exc.message
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await _api_error(request, ApiError(exc.status_code, str(exc.detail), kind))

    @app.get("/health")
    async def health():
        if worker.pipe is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "model": name(), "busy": worker.running is not None,
                "waiting": len(worker.waiting)}

    @app.get("/v1/models")
    async def models():
        data = [] if worker.pipe is None else [
            {"id": name(), "object": "model", "created": 0, "owned_by": "specexec",
             "context_length": worker.pipe.target.context_length}]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        pipe = _ready()
        messages = []
        for i, m in enumerate(req.messages):
            if m.content is None and m.role != "assistant":  # (an assistant's may be tool calls)
                raise ApiError(400, f"messages.{i}.content: a {m.role} message needs content",
                               param=f"messages.{i}.content")
            if isinstance(m.content, list) and any(p.type != "text" or p.text is None for p in m.content):
                raise ApiError(400, f"messages.{i}.content: only text parts are supported",
                               param=f"messages.{i}.content")
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return await _answer(request, req, _encode(lambda: pipe.encode_chat(messages), "messages"),
                             chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        pipe = _ready()
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        return await _answer(request, req, _encode(lambda: pipe.encode(prompt, raw=True), "prompt"),
                             chat=False)

    def _ready():
        if worker.pipe is None:
            raise ApiError(503, "the model is still loading; GET /health says when it is ready",
                           "unavailable_error", code="loading")
        return worker.pipe

    def _encode(encode: Callable[[], list[int]], param: str) -> list[int]:
        from jinja2 import TemplateError

        try:
            ids = encode()
        except (UserError, TemplateError, ValueError) as e:  # e.g. a template's own checks
            raise ApiError(400, str(e), param=param) from None
        context = worker.pipe.target.context_length
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context is {context}"
                                f"{worker.pipe.target.context_hint()}",
                           code="context_length_exceeded")
        return ids

    async def _answer(request: Request, req: _Sampling, ids: list[int], chat: bool):
        base = worker.settings
        try:
            settings = replace(
                base, max_new_tokens=req.max_completion_tokens or req.max_tokens or base.max_new_tokens,
                temperature=base.temperature if req.temperature is None else req.temperature,
                top_p=base.top_p if req.top_p is None else req.top_p,
                seed=base.seed if req.seed is None else req.seed)
        except UserError as e:  # named as the request's field, not the command line's flag
            tokens = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            fields = {"--max-new-tokens": tokens, "--temperature": "temperature",
                      "--top-p": "top_p", "--seed": "seed"}
            flag = next((f for f in fields if str(e).startswith(f + " ")), None)
            message = str(e).replace(flag, fields[flag], 1) if flag else str(e)
            raise ApiError(400, message, param=fields.get(flag)) from None
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        job = Job(ids, settings, stops, asyncio.get_running_loop())
        worker.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, model = int(time.time()), name()

        def chunk(text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model, "choices": [choice]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                sse = lambda obj: f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"  # noqa: E731
                sent, ended = 0, False  # text chunks sent; whether the generation's end came
                try:
                    if chat:
                        yield sse(chunk(first=True))
                    while True:
                        kind, value = await job.events.get()
                        if kind == "text":
                            yield sse(chunk(value))
                            sent += 1
                            continue
                        if kind == "cancelled":
                            return
                        ended = True  # the end is here: its log line stands, whatever follows
                        if kind == "error":
                            request.state.log = f"error: {value}"
                            yield sse(ApiError(500, value, "server_error").body())
                        else:
                            request.state.log = log_detail(value)
                            last = chunk(finish=value.finish_reason)
                            last["specexec"] = specexec_stats(value)
                            yield sse(last)
                            if include_usage:
                                yield sse({**chunk(), "choices": [], "usage": usage(value),
                                           "specexec": specexec_stats(value)})
                        yield "data: [DONE]\n\n"
                        return
                finally:  # also when the client went away: the stream is cancelled here
                    worker.cancel(job)
                    if not ended:
                        request.state.log = f"the client left after {count(sent, 'text chunk')}"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def cancel_on_disconnect():
            # The body has been read: the next message is the client leaving.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            worker.cancel(job)

        watcher = asyncio.create_task(cancel_on_disconnect())
        parts: list[str] = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    raise ApiError(500, value, "server_error")
                else:
                    break
        finally:
            watcher.cancel()
            worker.cancel(job)
        if kind == "cancelled" or value.finish_reason is None:
            request.state.log = "the client left" + (f"; {log_detail(value)}" if value else "")
            return JSONResponse({}, status_code=499)  # nginx's "client closed request"
        text, out = "".join(parts), value
        request.state.log = log_detail(out)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text})
        choice.update(logprobs=None, finish_reason=out.finish_reason)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model, "choices": [choice], "usage": usage(out),
                "specexec": specexec_stats(out)}

    app.add_middleware(JsonBodies)
    app.add_middleware(LogRequests, log=log)
    return app


# ---- running it ----

class Running:
    """uvicorn serving `app` on a thread, listening already when the constructor returns."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = host, sock.getsockname()[1]
        self.app = app
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="specexec-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.stop()
            raise UserError(f"the HTTP server did not start on {host}:{self.port}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.app.state.worker.close()
        self.server.should_exit = True
        self.thread.join(10)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(load: Callable[[], tuple], host: str = "127.0.0.1", port: int = 8000,
          queue_size: int = 8, model_name: str | None = None, log: Log = log_stderr) -> None:
    """Listen first (GET /health says "loading"), then `load()` -> (pipe, settings) in this
    thread, then serve until Ctrl+C or SIGTERM."""
    if threading.current_thread() is threading.main_thread():
        # Ctrl+C must reach us even when the shell that started us ignored SIGINT (a background
        # job of a script), and a service manager's SIGTERM stops us the same way.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    app = make_app(None, None, model_name, queue_size, log)
    running = Running(app, host, port)
    try:
        log(f"listening on {running.url} (OpenAI API under {running.url}/v1); loading the model")
        pipe, settings = load()
        app.state.worker.ready(pipe, settings)
        log(f"ready: {model_name or pipe.target_name} with {draft_text(pipe, settings.budget)}, "
            f"context {pipe.target.context_length}, {pipe.placement_text()}")
        while running.thread.is_alive():
            running.thread.join(0.5)
    finally:
        running.stop()
