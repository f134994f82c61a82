"""`specee-pc serve` as clients use it: a server process on a free loopback port, the `openai`
client, raw HTTP and curl."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import specee_pc

openai = pytest.importorskip("openai")

N_CTX = 1024
QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_path, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.alias = os.path.splitext(os.path.basename(model_path))[0]
        self.stderr = open(tmp_path / "server.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "specee_pc.cli", "serve", model_path, "--port", str(self.port), "-t", "2",
             "-c", str(N_CTX)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.time() + 120
        while True:
            try:
                self.get("/v1/models")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start: {self.log()}")
                time.sleep(0.5)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path, data: bytes):
        """(status, JSON body) of a raw POST."""
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    running = Server(model_path, tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


def test_greedy_chat_answer_equals_the_python_api(server, model_path):
    # the server's first request: a fresh context, as the Llama's below (a reused prompt prefix
    # changes batch shapes, which can flip llama.cpp's near-ties, in llama_cpp.Llama as well)
    answer = server.client.chat.completions.create(
        model=server.alias, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0,
        extra_body={"repeat_penalty": 1.0})
    llm = specee_pc.Llama(model_path, n_ctx=N_CTX, n_threads=2, verbose=False, speculate="auto")
    try:
        expected = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION}], max_tokens=32,
                                              temperature=0)
    finally:
        llm.close()
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"] > 0
    assert answer.model == server.alias
    stats = server.get("/extras/speculation")
    assert stats["mode"] == "speculate" and stats["summary"]["requests"] == 1
    assert stats["requests"][0]["completion_tokens"] == answer.usage.completion_tokens
    assert stats["requests"][0]["speculation"]["rounds"] > 0


def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client.models.list().data] == [server.alias]


def test_streamed_chat_arrives_in_chunks(server):
    chunks = list(server.client.chat.completions.create(
        model=server.alias, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=24,
        temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 5 and text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_stops_at_a_stop_string_and_counts_usage(server):
    result = server.client.completions.create(model=server.alias, prompt="Count: 1, 2, 3,", max_tokens=24,
                                              temperature=0, stop=[" 6"])
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and " 6" not in choice.text and " 4" in choice.text, choice.text
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens < 24
    sampled = server.client.completions.create(model=server.alias, prompt="Once upon a time", max_tokens=8,
                                               temperature=0.9, top_p=0.9, seed=7)
    assert sampled.usage.completion_tokens > 0


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    long_prompt = "word " * (N_CTX + 100)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model=server.alias, stream=stream,
                                                  messages=[{"role": "user", "content": long_prompt}])
        assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=server.alias, prompt="hi", max_tokens=-5)
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=server.alias, prompt="hi", extra_body={"grammar": "root ::= ("})
    status, body = server.post("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = server.post("/v1/completions", json.dumps({"prompt": "The sky is", "max_tokens": 4}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] > 0


def test_concurrent_requests_queue_and_complete(server):
    before = server.get("/extras/speculation")["summary"]["requests"]
    results = [None] * 3

    def ask(i):
        stream = server.client.completions.create(model=server.alias, prompt=f"List {i + 2} fruits:", max_tokens=16,
                                                  temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(r for r in results), results
    stats = server.get("/extras/speculation")
    assert stats["summary"]["requests"] == before + 3
    assert all(r["completion_tokens"] > 0 for r in stats["requests"][-3:])


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_streams_server_sent_events(server):
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "stream": True})
    out = subprocess.run(["curl", "-sN", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=120).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


def test_ctrl_c_stops_the_server_cleanly(server):
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0
    log = server.log()
    assert "Traceback" not in log and "server stopped" in log, log


def test_bad_options_are_one_line_errors(tmp_path):
    for args in (["-c", "-5"], ["--threshold", "-3"], ["--draft-max", "0"], ["--port", "70000"]):
        result = subprocess.run([sys.executable, "-m", "specee_pc.cli", "serve", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (args, result.stderr)
