"""`specexec serve` as its clients meet it: the official `openai` client and plain HTTP against the
real default model, served on a free loopback port."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from specexec_app.config.settings import DecodeSettings
from specexec_app.core.engine import Done, Text
from specexec_app.loading.session import build_named
from specexec_app.ui.serve import Running, StopText, make_app

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def pipe():
    return build_named("default")


@pytest.fixture(scope="module")
def server(pipe):
    """One request generates, one more may wait: a third is refused."""
    lines = []
    app = make_app(pipe, DecodeSettings(budget=8, max_new_tokens=12),
                   queue_size=1, log=lines.append)
    running = Running(app, "127.0.0.1", 0)
    running.lines = lines
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine(pipe, ids, max_new):
    """What the engine itself answers, greedy (run only while the server is idle)."""
    parts, done = [], None
    for e in pipe.generate(ids, DecodeSettings(budget=8, max_new_tokens=max_new)):
        if isinstance(e, Text):
            parts.append(e.text)
        elif isinstance(e, Done):
            done = e
    return "".join(parts), done.stats


def sse(http, path, body):
    """The parsed `data:` events of a streamed response, up to [DONE]."""
    events = []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    return events
                events.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def wait_until(check, seconds):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(pipe, http):
    """The greedy answer to QUESTION from the engine, and the server's streamed deltas of it."""
    text, stats = engine(pipe, pipe.encode_chat(QUESTION), 12)
    events = sse(http, CHAT, {"messages": QUESTION, "max_tokens": 12})
    return text, stats, events


def test_stop_text_cuts_across_deltas():
    s = StopText(["END", "xy"])
    assert s.push("abcE") == "abc" and s.push("N") == "" and s.push("Dmore") == "" and s.hit
    s = StopText(["xyz", "y"])
    assert s.push("axy") == "ax" and s.hit  # the earliest stop wins
    s = StopText(["END"])
    assert s.push("aE") == "a" and s.push("Nd") == "ENd" and s.flush() == "" and not s.hit
    s = StopText(["END"])
    assert s.push("aEN") == "a" and s.flush() == "EN"  # a held prefix comes out at the end


def test_openai_client_answers_as_the_engine(pipe, server, client, reference):
    text, stats, _ = reference
    r = client.chat.completions.create(model="anything", messages=QUESTION, max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == text and text
    assert r.choices[0].finish_reason == ("stop" if stats.stop_reason == "eos" else "length")
    assert r.usage.prompt_tokens == len(pipe.encode_chat(QUESTION))
    assert r.usage.completion_tokens == stats.new_tokens
    vendor = r.model_extra["specexec"]
    assert vendor["target_passes"] >= 1 and vendor["accepted_per_pass"] >= 1
    assert vendor["tokens_per_s"] > 0 and vendor["pass_ms"] > 0

    chunks = list(client.chat.completions.create(model="x", messages=QUESTION, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == text
    assert chunks[-1].usage.completion_tokens == stats.new_tokens

    prompt = "The three primary colors are"
    raw, _ = engine(pipe, pipe.encode(prompt, raw=True), 10)
    assert client.completions.create(model="x", prompt=prompt, max_tokens=10).choices[0].text == raw
    streamed = client.completions.create(model="x", prompt=prompt, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == raw
    assert [m.id for m in client.models.list().data] == [pipe.target_name]
    assert any(re.search(r"POST /v1/chat/completions 200 .*tok/s, [0-9.]+ accepted/pass", line)
               for line in server.lines)


def test_plain_http_stream_and_stop_strings(http, reference):
    text, _, events = reference
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["specexec"]["target_passes"] >= 1
    # A stop string that spans two deltas: the text is cut where it begins.
    i = next(i for i in range(1, len(deltas) - 1) if deltas[i] and deltas[i + 1])
    stop = deltas[i][-2:] + deltas[i + 1][:2]
    expected = text[:text.find(stop)]
    body = {"messages": QUESTION, "max_tokens": 12, "stop": ["@@never@@", stop]}
    streamed = sse(http, CHAT, body)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed) == expected
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
    r = http.post(CHAT, json={**body, "stop": stop}).json()
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    # `curl -d` labels a JSON body form-encoded: it is read as JSON all the same.
    r = http.post(CHAT, content=json.dumps({"messages": QUESTION, "max_tokens": 12}),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text


def test_two_concurrent_clients_are_answered_in_turn(pipe, server, client):
    asks = [[{"role": "user", "content": q}] for q in ("Name a fruit.", "Name a planet.")]
    expected = [engine(pipe, pipe.encode_chat(m), 10)[0] for m in asks]
    before = len(server.app.state.worker.history)
    answers = [None, None]

    def ask(k):
        answers[k] = client.chat.completions.create(model="x", messages=asks[k], max_tokens=10)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [a.choices[0].message.content for a in answers] == expected
    first, second = list(server.app.state.worker.history)[before:]
    assert first.ended <= second.started  # one generation at a time


def test_full_queue_is_429_and_a_dropped_stream_frees_the_server(pipe, server, http, client):
    worker = server.app.state.worker
    ask = [{"role": "user", "content": "Name a color."}]
    expected = engine(pipe, pipe.encode_chat(ask), 6)[0]
    before = len(worker.history)
    waiting = {}
    story = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
             "max_tokens": 300, "stream": True}
    with http.stream("POST", CHAT, json=story) as a:
        lines, seen = a.iter_lines(), 0  # held: dropping the iterator would close the connection
        while seen < 3:
            line = next(lines)
            seen += '"content": "' in line and '"content": ""' not in line
        # Another request waits behind the story; a third finds the queue full.
        t = threading.Thread(target=lambda: waiting.update(
            r=client.chat.completions.create(model="x", messages=ask, max_tokens=6)))
        t.start()
        wait_until(lambda: http.get("/health").json()["waiting"] == 1, 30)
        full = http.post(CHAT, json={"messages": ask, "max_tokens": 6})
        assert full.status_code == 429
        assert full.json()["error"]["type"] == "rate_limit_error"
    # The story's client has gone: its generation stops at the next pass and the waiter is served.
    t.join(60)
    assert waiting["r"].choices[0].message.content == expected
    dropped, served = list(worker.history)[before:]
    assert dropped.finish_reason is None and dropped.stats.stop_reason == "cancelled"
    assert 3 <= dropped.stats.new_tokens < 300
    assert dropped.stats.target_passes <= dropped.passes_at_cancel + 1
    assert dropped.ended <= served.started
    # Its log line says the client left, and after how much.
    left = r"POST /v1/chat/completions 200 .* \| the client left after [0-9]+ text chunks"
    wait_until(lambda: any(re.search(left, line) for line in server.lines), 30)


def test_a_client_that_leaves_before_a_whole_answer_stops_it(server, http):
    worker = server.app.state.worker
    before = len(worker.history)
    story = {"messages": [{"role": "user", "content": "Write a long story about a cat."}],
             "max_tokens": 300}
    with pytest.raises(httpx.TimeoutException):
        http.post(CHAT, json=story, timeout=1.5)  # the client gives up and closes the connection
    wait_until(lambda: len(worker.history) > before, 30)
    left = worker.history[-1]
    assert left.stats.stop_reason == "cancelled" and left.stats.new_tokens < 300
    assert left.stats.target_passes <= left.passes_at_cancel + 1
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


BAD = [
    ("POST", CHAT, '{"messages": [', 400),
    ("POST", CHAT, "[1, 2]", 400),
    ("POST", CHAT, {"messages": "hi"}, 400),
    ("POST", CHAT, {"messages": []}, 400),
    ("POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    ("POST", CHAT, {"messages": [{"role": "user"}]}, 400),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("POST", CHAT, {"messages": QUESTION, "max_tokens": 0}, 400),
    ("POST", CHAT, {"messages": QUESTION, "max_tokens": -3}, 400),
    ("POST", CHAT, {"messages": QUESTION, "max_tokens": "10"}, 400),
    ("POST", CHAT, {"messages": QUESTION, "max_tokens": 2.5}, 400),
    ("POST", CHAT, {"messages": QUESTION, "temperature": -0.1}, 400),
    ("POST", CHAT, {"messages": QUESTION, "temperature": 2.5}, 400),
    ("POST", CHAT, {"messages": QUESTION, "temperature": "hot"}, 400),
    ("POST", CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
    ("POST", CHAT, {"messages": QUESTION, "top_p": 0}, 400),
    ("POST", CHAT, {"messages": QUESTION, "stream": "yes"}, 400),
    ("POST", CHAT, {"messages": QUESTION, "stop": 7}, 400),
    ("POST", CHAT, {"messages": QUESTION, "n": 2}, 400),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "hello " * 9000}]}, 400),
    ("POST", "/v1/completions", {"prompt": "   "}, 400),
    ("POST", "/v1/completions", {"max_tokens": 3}, 400),
    ("GET", CHAT, None, 405),
    ("GET", "/v1/nothing", None, 404),
]


def test_each_bad_request_gets_its_4xx_and_the_server_goes_on(http):
    good = {"prompt": "Hello", "max_tokens": 1}
    for method, path, body, status in BAD:
        kw = {"content": body, "headers": {"content-type": "application/json"}} \
            if isinstance(body, str) else {"json": body} if body is not None else {}
        r = http.request(method, path, **kw)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        ok = http.post("/v1/completions", json=good)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1
    # Range errors name the request's field, not the command line's flag.
    for field, value, needle in (("max_tokens", 10**11, "max_tokens must be at most"),
                                 ("max_completion_tokens", 10**11, "max_completion_tokens must be"),
                                 ("seed", -1, "seed must be 0 or more")):
        r = http.post(CHAT, json={"messages": QUESTION, field: value})
        error = r.json()["error"]
        assert r.status_code == 400 and error["message"].startswith(needle), error
        assert error["param"] == field and "--" not in error["message"], error
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": "hello " * 9000}]})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "the context is 8192" in r.json()["error"]["message"]


def test_second_turn_prefills_only_the_new_tokens(pipe, http, monkeypatch):
    first = http.post(CHAT, json={"messages": QUESTION, "max_tokens": 12}).json()
    reply = first["choices"][0]["message"]["content"]
    turns = QUESTION + [{"role": "assistant", "content": reply},
                        {"role": "user", "content": "And of Italy?"}]
    ids1, ids2 = pipe.encode_chat(QUESTION), pipe.encode_chat(turns)
    pending = []  # tokens each pass runs beside the cached ones
    sync = pipe.target.kv.sync
    monkeypatch.setattr(pipe.target.kv, "sync", lambda tokens: pending.append(len(p := sync(tokens))) or p)
    second = http.post(CHAT, json={"messages": turns, "max_tokens": 12}).json()
    reused = second["specexec"]["reused_prompt_tokens"]
    assert reused >= len(ids1) and second["usage"]["prompt_tokens"] == len(ids2)
    assert pending[0] == len(ids2) - reused == second["specexec"]["prefilled_prompt_tokens"]
    monkeypatch.undo()
    pipe.target.kv.reset()  # a fresh cache gives the same answer
    assert second["choices"][0]["message"]["content"] == engine(pipe, ids2, 12)[0]


def test_health_says_loading_until_ready(pipe):
    app = make_app(log=lambda line: None)
    running = Running(app, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=running.url, timeout=10) as http:
            assert http.get("/health").json() == {"status": "loading"}
            r = http.post(CHAT, json={"messages": QUESTION})
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
            assert http.get("/v1/models").json()["data"] == []
            app.state.worker.ready(pipe, DecodeSettings())
            assert http.get("/health").json()["status"] == "ready"
    finally:
        running.stop()


def test_specexec_serve_command(pipe):
    """The CLI: listening at once, "loading" then "ready", answers, a log line, Ctrl+C ends it."""
    proc = subprocess.Popen([sys.executable, "-m", "specexec_app", "serve", "--port", "0",
                             "--max-new-tokens", "8"], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, COLUMNS="300"))
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    log = []

    def next_line(seconds=60):
        log.append(lines.get(timeout=seconds))
        return log[-1]

    try:
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", next_line()).group(1)
        with httpx.Client(base_url=url, timeout=60) as http:
            wait_until(lambda: http.get("/health").status_code == 200, 120)
            r = http.post(CHAT, json={"messages": QUESTION}).json()
        assert r["choices"][0]["message"]["content"] == engine(pipe, pipe.encode_chat(QUESTION), 8)[0]
        while "POST /v1/chat/completions 200" not in log[-1]:
            next_line()
        assert re.search(r"tok/s, [0-9.]+ accepted/pass", log[-1])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
