# server.py end to end: a real server process on a free loopback port, spoken to with the official
# openai client (and raw HTTP where a client would refuse to send the fault). Greedy answers equal
# generate.py's for the same prompts, alone or among more requests than slots; usage and
# finish_reason are right; a client that goes away frees its slot; faults are OpenAI error objects;
# SIGTERM drains and exits 0; an engine failure is a 500 and a non-zero exit. Every server process
# is killed in a finally, whatever the test did.
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

import generate as G
import server as S
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test"
MAX_SEQ = 1024
SD = ("--speculate", "self", "--gamma", "3", "--draft_budget", "24", "--sinks", "4")
PROMPTS = ["Hello there", "Once upon a time", "1 2 3 4", "The quick brown fox"]  # "1 2 3 4" meets its EOS early
LONG = "Tell me a story"  # no EOS for 1000 tokens


class Server:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)

    def health(self):
        return self.raw("GET", "/health")[1]

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def stderr(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()


@contextlib.contextmanager
def running(tmp_path, checkpoint, *flags, code=None, timeout=60):
    """A server process (or, with code, `python -c code` with the flags) until the block ends, then killed."""
    argv = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(REPO, "server.py")]
    log = open(tmp_path / f"server-{time.monotonic_ns()}.err", "w")
    proc = subprocess.Popen([*argv, "--checkpoint_path", checkpoint, "--port", "0", "--api_key", KEY, *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline, line = time.monotonic() + timeout, ""
        while not line.startswith("serving "):
            assert proc.poll() is None, open(log.name).read()
            assert time.monotonic() < deadline, "no ready line"
            if select.select([proc.stdout], [], [], 0.2)[0]:
                line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        yield Server(proc, port, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        log.close()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def ar(tmp, tiny_checkpoint):
    with running(tmp, tiny_checkpoint, "--batch_size", "2", "--max_seq_len", str(MAX_SEQ), "--max_queue", "16") as s:
        yield s


@pytest.fixture(scope="module")
def sd(tmp, tiny_checkpoint):
    with running(tmp, tiny_checkpoint, "--batch_size", "2", "--max_seq_len", str(MAX_SEQ), *SD) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def solo(tmp, tiny_checkpoint, tokenizer):
    """solo(prompts, n, *flags) -> each prompt's generated ids from generate.py (one row each)."""
    cache = {}

    def run(prompts, n, *flags):
        key = (tuple(prompts), n, flags)
        if key not in cache:
            out = tmp / f"ref-{len(cache)}.json"
            argv = ["--checkpoint_path", tiny_checkpoint, "--max_new_tokens", str(n), "--max_seq_len", str(MAX_SEQ),
                    "--json", str(out), *flags]
            assert G.cli(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
            cache[key] = json.loads(out.read_text())["tokens"]
        return cache[key]
    return run


def text(tokenizer, ids):
    return G.text_of(tokenizer, ids)


def reason(tokenizer, ids, n):
    return "stop" if ids[-1] in tokenizer.eos_ids else "length" if len(ids) == n else None


def streamed(chunks, chat=False):
    """A stream's chunks -> (text, finish_reason, usage)."""
    parts, finish, usage = [], None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            parts.append((ch.delta.content or "") if chat else ch.text)
            finish = ch.finish_reason or finish
    return "".join(parts), finish, usage


def model_of(s):
    return s.client.models.list().data[0].id


# ---- answers equal generate.py's ----

@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_completions_equal_generate(request, tokenizer, solo, mode):
    s = request.getfixturevalue(mode)
    n = 24
    refs = solo(PROMPTS, n, *(SD if mode == "sd" else ()))
    assert {reason(tokenizer, r, n) for r in refs} == {"stop", "length"}  # both endings are tried
    model = model_of(s)
    for prompt, ref in zip(PROMPTS, refs):
        usage = dict(prompt_tokens=len(G.prompt_ids(tokenizer, prompt)), completion_tokens=len(ref))
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        r = s.client.completions.create(model=model, prompt=prompt, max_tokens=n)
        assert r.choices[0].text == text(tokenizer, ref), prompt
        assert r.choices[0].finish_reason == reason(tokenizer, ref, n)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == tuple(usage.values())
        chunks = list(s.client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True,
                                                  stream_options={"include_usage": True}))
        got, finish, u = streamed(chunks)
        assert (got, finish) == (text(tokenizer, ref), reason(tokenizer, ref, n)), prompt
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == tuple(usage.values())
        assert len(chunks) > 3  # streamed as it was made, not in one piece


def test_chat_equals_generate_chat(ar, tokenizer, solo):
    questions, n = ["What is 2+2?", "Name a colour."], 20
    refs = solo(questions, n, "--chat")
    model = model_of(ar)
    for q, ref in zip(questions, refs):
        messages = [{"role": "user", "content": q}]
        r = ar.client.chat.completions.create(model=model, messages=messages, max_tokens=n)
        assert r.choices[0].message.content == text(tokenizer, ref) and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == reason(tokenizer, ref, n) and r.usage.completion_tokens == len(ref)
        assert r.usage.prompt_tokens == len(G.prompt_ids(tokenizer, messages))
        got, finish, _ = streamed(ar.client.chat.completions.create(model=model, messages=messages, max_tokens=n,
                                                                    stream=True), chat=True)
        assert (got, finish) == (text(tokenizer, ref), reason(tokenizer, ref, n))


def test_more_requests_than_slots_each_get_their_solo_answer(ar, tokenizer, solo):
    """Eight requests, some arriving while others run, through 2 slots: each equals its own solo
    output cut at its max_tokens; /health shows them waiting for slots."""
    prompts, n = PROMPTS + [LONG], 300
    refs = dict(zip(prompts, solo(prompts, n)))
    jobs = [(LONG, 300, True), (PROMPTS[0], 40, False), (LONG, 120, False), (PROMPTS[3], 200, True),
            (PROMPTS[1], 30, True), (PROMPTS[2], 25, False), (LONG, 5, False), (PROMPTS[3], 1, True)]
    model, results, seen, done = model_of(ar), {}, [], threading.Event()

    def one(i, prompt, max_tokens, stream):
        time.sleep(0.05 * i)
        if stream:
            results[i] = streamed(ar.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                               stream=True))[:2]
        else:
            r = ar.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
            results[i] = r.choices[0].text, r.choices[0].finish_reason

    def watch():
        while not done.is_set():
            seen.append(ar.health())
            time.sleep(0.02)

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    watcher.join()
    for i, (prompt, max_tokens, _) in enumerate(jobs):
        ids = refs[prompt][:max_tokens]
        assert results[i] == (text(tokenizer, ids), reason(tokenizer, ids, max_tokens)), (i, prompt)
    assert max(h["running"] for h in seen) == 2 and max(h["waiting"] for h in seen) >= 1


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_each_request_samples_its_own_way(request, tokenizer, solo, mode):
    """Requests with their own temperature, top_k and top_p share the slots' rounds: a greedy one
    (temperature 0, or none given: the server's greedy default) equals its solo output, top-k 1
    sampling is the argmax whatever the temperature, and a hot request leaves the greedy path."""
    s = request.getfixturevalue(mode)
    n = 40
    (ref,) = solo([LONG], n, *(SD if mode == "sd" else ()))
    greedy = text(tokenizer, ref)
    model, results = model_of(s), {}
    jobs = {"default": {}, "temperature 0": dict(temperature=0), "top_k 1": dict(temperature=1.5, extra_body={"top_k": 1}),
            "hot": dict(temperature=5.0), "hot, top_p": dict(temperature=3.0, top_p=0.9)}

    def one(name, kw):
        results[name] = s.client.completions.create(model=model, prompt=LONG, max_tokens=n, **kw).choices[0].text

    threads = [threading.Thread(target=one, args=job) for job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results["default"] == results["temperature 0"] == results["top_k 1"] == greedy
    assert results["hot"] != greedy and results["hot, top_p"] != greedy


def test_stop_string_ends_the_answer_before_it(ar, tokenizer, solo):
    n = 80
    (ref,) = solo([LONG], n)
    full = text(tokenizer, ref)
    at = next(i for i in range(20, len(full)) if full[i:i + 3].isascii() and full[i:i + 3].isprintable())
    stop = full[at:at + 3]
    want = full[:full.find(stop)]
    k = next(k for k in range(1, n + 1) if stop in text(tokenizer, ref[:k]))  # the token that completes it
    model = model_of(ar)
    r = ar.client.completions.create(model=model, prompt=LONG, max_tokens=n, stop=[stop, "never said"])
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (want, "stop", k)
    got = streamed(ar.client.completions.create(model=model, prompt=LONG, max_tokens=n, stop=stop, stream=True))
    assert got[:2] == (want, "stop")


# ---- faults ----

def test_a_client_that_goes_away_frees_its_slot(ar):
    """Both slots taken by long streams whose clients then go away: the server cancels them (far
    short of their 1000 tokens), its slots are free, and a later request is answered."""
    model, before = model_of(ar), ar.health()
    streams = [ar.client.completions.create(model=model, prompt=LONG, max_tokens=1000, stream=True) for _ in range(2)]
    for st in streams:
        it = iter(st)
        for _ in range(3):
            next(it)
        st.close()
    deadline = time.monotonic() + 5
    while (h := ar.health())["running"] or h["requests_cancelled"] < before["requests_cancelled"] + 2:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["requests_cancelled"] == before["requests_cancelled"] + 2
    assert h["completion_tokens"] - before["completion_tokens"] < 1000  # neither ran to its end
    # not streamed: the client sends its request and hangs up while it runs
    body = json.dumps({"model": model, "prompt": LONG, "max_tokens": 1000}).encode()
    with socket.create_connection(("127.0.0.1", ar.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while not ar.health()["running"]:
            assert time.monotonic() < deadline + 10
            time.sleep(0.02)
    while (h := ar.health())["running"] or h["requests_cancelled"] < before["requests_cancelled"] + 3:
        assert time.monotonic() < deadline + 15, h
        time.sleep(0.05)
    r = ar.client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=5)
    assert r.usage.completion_tokens == 5 and ar.health()["running"] == 0


BAD = {  # body changes -> (status, param)
    "unknown field": ({"best_of_all": 2}, 400, "best_of_all"),
    "max_tokens a string": ({"max_tokens": "5"}, 400, "max_tokens"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens"),
    "empty prompt": ({"prompt": ""}, 400, "prompt"),
    "prompt a number": ({"prompt": 7}, 400, "prompt"),
    "prompt longer than the cache": ({"prompt": "hello " * MAX_SEQ}, 400, "prompt"),
    "prompt and max_tokens past the cache": ({"max_tokens": MAX_SEQ}, 400, "max_tokens"),
    "negative temperature": ({"temperature": -0.5}, 400, "temperature"),
    "temperature a string": ({"temperature": "hot"}, 400, "temperature"),
    "top_p 0": ({"top_p": 0}, 400, "top_p"),
    "top_p above 1": ({"top_p": 1.5}, 400, "top_p"),
    "top_k negative": ({"top_k": -1}, 400, "top_k"),
    "top_k a fraction": ({"top_k": 2.5}, 400, "top_k"),
    "stream not a boolean": ({"stream": "yes"}, 400, "stream"),
    "stop a number": ({"stop": 3}, 400, "stop"),
    "another model": ({"model": "gpt-5"}, 404, "model"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_an_error_object(ar, case):
    change, status, param = BAD[case]
    body = {"model": model_of(ar), "prompt": "Hello", "max_tokens": 4} | change
    got, err = ar.raw("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    assert got == status and set(err["error"]) == {"message", "type", "param", "code"}, err
    assert err["error"]["param"] == param and err["error"]["message"], err


def test_bad_requests_through_the_client(ar):
    model, auth = model_of(ar), {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.BadRequestError) as e:
        ar.client.chat.completions.create(model=model, messages=[], max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        ar.client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ar.client.completions.create(model=model, prompt="Hi", temperature=-1.0)
    wrong = openai.OpenAI(base_url=ar.client.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model, prompt="Hi", max_tokens=2)
    for body in (b"{not json", b'{"model": NaN}', b"\xff\xfe", b"[1, 2]"):
        status, err = ar.raw("POST", "/v1/completions", body, auth)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (body, err)
    assert ar.raw("GET", "/v1/nothing", headers=auth)[0] == 404
    assert ar.health()["status"] == "ok"  # none of it hurt the server


def test_a_full_queue_refuses_at_once(tmp, tiny_checkpoint):
    with running(tmp, tiny_checkpoint, "--batch_size", "1", "--max_queue", "1", "--max_seq_len", str(MAX_SEQ)) as s:
        model = model_of(s)
        first = s.client.completions.create(model=model, prompt=LONG, max_tokens=1000, stream=True)
        next(iter(first))  # it holds the one slot
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=s.client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=6)))
        t.start()
        deadline = time.monotonic() + 10
        while s.health()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            s.client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6)
        assert time.monotonic() - t0 < 2 and e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        first.close()  # the slot frees; the waiting request is answered
        t.join(timeout=30)
        assert waiting["r"].usage.completion_tokens == 6


def test_sigterm_finishes_what_is_in_flight_and_exits_0(tmp, tiny_checkpoint, tokenizer, solo):
    """SIGTERM with a request mid-stream (and the time it gets to finish set high, for a loaded
    machine): it finishes whole, then the server exits 0; then, a stream the default 5 s cannot
    finish is cut off with an error event and the server still exits 0, within the bound."""
    (ref,) = solo([LONG], 100)
    with running(tmp, tiny_checkpoint, "--batch_size", "1", "--max_seq_len", str(MAX_SEQ),
                 "--shutdown_timeout", "60") as s:
        model = model_of(s)
        stream = iter(s.client.completions.create(model=model, prompt=LONG, max_tokens=100, stream=True))
        first = next(stream)
        s.proc.send_signal(signal.SIGTERM)
        got = streamed([first, *stream])
        assert got[:2] == (text(tokenizer, ref), "length")  # the request in flight was finished
        assert s.proc.wait(timeout=30) == 0
        with pytest.raises(openai.APIConnectionError):
            s.client.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert "stopping: 1 request(s) in flight" in s.stderr()
    with running(tmp, tiny_checkpoint, "--batch_size", "1", "--max_seq_len", str(MAX_SEQ),
                 "--shutdown_timeout", "0.5") as s:
        stream = s.client.completions.create(model=model, prompt=LONG, max_tokens=1000, stream=True)
        chunks = [next(iter(stream))]
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shut down before the request finished"):
            chunks.extend(stream)
        assert s.proc.wait(timeout=15) == 0 and time.monotonic() - t0 < 15


FAILING = """
import sys, engine, server
real, calls = engine.decode_round, [0]
def failing(*a, **k):
    calls[0] += 1
    if calls[0] == 5:
        raise RuntimeError("injected fault in a decode round")
    return real(*a, **k)
engine.decode_round = failing
sys.exit(server.cli(sys.argv[1:]))
"""


def test_a_failing_step_is_a_500_and_a_nonzero_exit(tmp, tiny_checkpoint):
    with running(tmp, tiny_checkpoint, "--batch_size", "2", "--max_seq_len", str(MAX_SEQ), code=FAILING) as s:
        model = model_of(s)
        errors = []

        def one():
            try:
                s.client.completions.create(model=model, prompt=LONG, max_tokens=100)
            except openai.APIStatusError as e:
                errors.append(e)
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert [e.status_code for e in errors] == [500, 500] and all(e.body["message"] for e in errors)
        assert s.proc.wait(timeout=10) == 1
        log = s.stderr()
        assert "Traceback" in log and "injected fault in a decode round" in log and "error: the engine failed" in log


@pytest.mark.parametrize("argv,expected", [
    (["--port", "70000"], "--port must be in 0-65535"),
    (["--max_queue", "0"], "--max_queue must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--prompt", "hi"], "unrecognized arguments: --prompt hi"),
])
def test_bad_flags_are_one_line(tiny_checkpoint, capsys, argv, expected):
    assert S.cli(["--checkpoint_path", tiny_checkpoint, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err
