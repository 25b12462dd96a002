# An OpenAI-compatible HTTP server over the engine's continuous-batching loop (engine.serve).
#   python server.py --batch_size 8 --speculate self --compile --port 8000
#   curl http://127.0.0.1:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 16}'
#
# The standard library's ThreadingHTTPServer gives each connection a thread: it checks the request,
# tokenizes it, submits it to the RequestQueue and waits on the request's own queue of events,
# which the one engine thread fills once per round (its tokens, then its end). Everything the
# engine needs is a flag of generate.py's. Each request samples with its own temperature, top_p and
# top_k (the server's flags when it gives none): they are per-row tensors of the compiled steps.
import hmac
import json
import math
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import generate as G
from engine import Request, RequestQueue, serve, text_until_stop
from spec import Sampling

MAX_BODY = 1 << 24  # bytes of a request body
POLL_S = 0.2  # how often a waiting handler looks whether its client went away
MAX_STOP = 4  # stop strings a request may give, as OpenAI allows


class ApiError(Exception):
    """A request refused, as the HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- checking a request

COMMON = {"model", "max_tokens", "stop", "stream", "stream_options", "temperature", "top_p", "top_k", "n", "user",
          "presence_penalty", "frequency_penalty"}
FIELDS = {"/v1/completions": COMMON | {"prompt", "echo", "logprobs"},
          "/v1/chat/completions": COMMON | {"messages", "max_completion_tokens", "logprobs"}}
ROLES = ("system", "user", "assistant")


def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def integer(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check(ok, message, param, code="invalid_value"):
    if not ok:
        raise ApiError(400, message, param, code)


def conversation(messages) -> list:
    """OpenAI's messages -> [{"role", "content"}] with text content, as the chat template takes them."""
    check(isinstance(messages, list) and messages, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        check(isinstance(m, dict), f"{where} must be an object with 'role' and 'content'", where)
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise ApiError(400, f"{where}: unknown field {unknown[0]!r}", f"{where}.{unknown[0]}", "unknown_field")
        check(m.get("role") in ROLES, f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # parts: only text ones
            check(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content),
                  f"{where}.content parts must be text parts ({{'type': 'text', 'text': ...}})", f"{where}.content")
            content = "".join(p["text"] for p in content)
        check(isinstance(content, str), f"{where}.content must be a string", f"{where}.content")
        out.append({"role": m["role"], "content": content})
    return out


def request_sampling(body, s: Sampling) -> Sampling:
    """The request's temperature, top_p and top_k, each the server's (s) where not given."""
    if "temperature" in body:
        t = body["temperature"]
        check(number(t) and t >= 0, "temperature must be a finite number >= 0 (0: greedy)", "temperature")
        s = replace(s, temperature=float(t))
    if "top_p" in body:
        check(number(body["top_p"]) and 0 < body["top_p"] <= 1, "top_p must be a number in (0, 1] (1: off)", "top_p")
        s = replace(s, top_p=float(body["top_p"]))
    if "top_k" in body:
        check(integer(body["top_k"]) and body["top_k"] >= 0, "top_k must be an integer >= 0 (0: off)", "top_k")
        s = replace(s, top_k=body["top_k"])
    return s


def parse_request(body, path, *, tokenizer, model_name, s: Sampling, max_seq_len, max_new_tokens) -> tuple:
    """A request body -> (Request, stream, include_usage), or ApiError: every field checked, the prompt
    tokenized and measured against the cache before anything queues."""
    check(isinstance(body, dict), "the request body must be a JSON object", None)
    unknown = sorted(set(body) - FIELDS[path])
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0], "unknown_field")
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI's clients send null for "not given"
    model = body.get("model")
    check(isinstance(model, str), "model must be a string (GET /v1/models lists it)", "model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist: this server serves {model_name!r}", "model",
                       "model_not_found")
    sampling = request_sampling(body, s)
    for name, want in (("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if name in body:
            check(number(body[name]), f"{name} must be a number", name)
            check(body[name] == want, f"{name} must be {want} on this server", name, "unsupported_value")
    check(body.get("echo", False) is False, "echo must be false on this server", "echo", "unsupported_value")
    check(not body.get("logprobs"), "logprobs are not returned by this server", "logprobs", "unsupported_value")
    check(isinstance(body.get("user", ""), str), "user must be a string", "user")
    stream = body.get("stream", False)
    check(isinstance(stream, bool), "stream must be a boolean", "stream")
    options = body.get("stream_options", {})
    check(isinstance(options, dict) and set(options) <= {"include_usage"}
          and isinstance(options.get("include_usage", False), bool),
          "stream_options must be an object with a boolean include_usage", "stream_options")
    check(stream or "stream_options" not in body, "stream_options needs stream: true", "stream_options")
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    check(isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(x, str) and x for x in stop),
          f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    length_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(length_field)
    if max_tokens is not None:
        check(integer(max_tokens) and max_tokens >= 1, f"{length_field} must be an integer >= 1", length_field)

    if path == "/v1/chat/completions":
        check("messages" in body, "messages is required", "messages")
        param, prompt = "messages", conversation(body["messages"])
    else:
        param, prompt = "prompt", body.get("prompt")
        vocab = tokenizer.vocab_size
        check(isinstance(prompt, str) or (isinstance(prompt, list) and all(integer(t) and 0 <= t < vocab for t in prompt)),
              f"prompt must be a string or a list of token ids (0-{vocab - 1})", "prompt")
    try:
        ids = list(prompt) if isinstance(prompt, list) and param == "prompt" else G.prompt_ids(tokenizer, prompt)
    except G.ChatTemplateError as e:
        raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
    check(ids, f"{param} is empty", param)
    room = max_seq_len - len(ids)
    check(room >= 1, f"the prompt is {len(ids)} tokens: it leaves no room in this server's {max_seq_len}-position "
                     f"cache (--max_seq_len)", param, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(max_new_tokens, room)
    check(max_tokens <= room, f"{len(ids)} prompt tokens plus {length_field} {max_tokens} need {len(ids) + max_tokens} "
                              f"positions, more than this server's {max_seq_len} (--max_seq_len)",
          length_field, "context_length_exceeded")
    rid = ("chatcmpl-" if param == "messages" else "cmpl-") + uuid.uuid4().hex[:24]
    req = Request(rid, ids, max_tokens, where=param, stop=tuple(stop), sampling=sampling)
    return req, stream, options.get("include_usage", False)


# ---------------------------------------------------------------- the engine side

class Server:
    """What the handler threads share with the engine thread: the queue into the engine, each
    request's queue of events out of it ("tokens", ids) ... ("done", record) or ("error", status,
    message), and the counts /health reports."""

    def __init__(self, engine, tokenizer, s: Sampling, *, model_name, max_queue, max_new_tokens):
        self.engine, self.tokenizer, self.s, self.model_name = engine, tokenizer, s, model_name
        self.max_new_tokens = max_new_tokens
        self.queue = RequestQueue(max_waiting=max_queue)
        self.lock = threading.Lock()
        self.events = {}  # request id -> (Request, queue.Queue of its events), until its handler returns
        self.running = set()  # ids of requests holding a slot
        self.counts = dict(finished=0, cancelled=0, accepted=0, evaluated=0, completion_tokens=0)
        self.handlers = 0  # completion requests being answered
        self.draining, self.failed = False, None
        self.loop_done = threading.Event()

    def decode(self, ids):
        return G.text_of(self.tokenizer, ids)

    def submit(self, req: Request) -> queue.Queue:
        events = queue.Queue()
        with self.lock:
            if self.failed is not None:
                raise ApiError(500, "the engine failed; the server is exiting", code="engine_failed")
            if self.draining:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            self.events[req.id] = (req, events)
        if not self.queue.submit(req):
            self.forget(req)
            if self.failed is not None:
                raise ApiError(500, "the engine failed; the server is exiting", code="engine_failed")
            if self.queue.closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            raise ApiError(429, f"the queue is full ({self.queue.max_waiting} requests wait for "
                                f"{self.engine.batch_size} slots): retry later", code="queue_full")
        return events

    def forget(self, req):
        with self.lock:
            self.events.pop(req.id, None)

    def cancel(self, req):
        """The client went away: the engine drops the request at its next round (or when it comes to take it)."""
        req.cancelled = True
        with self.lock:
            self.counts["cancelled"] += 1

    def post(self, req, event):
        with self.lock:
            entry = self.events.get(req.id)
        if entry is not None:
            entry[1].put(event)

    def on_tokens(self, req, ids):
        with self.lock:
            self.running.add(req.id)
        self.post(req, ("tokens", ids))

    def on_finish(self, req, record):
        with self.lock:
            self.running.discard(req.id)
            if record["finish_reason"] != "cancelled":
                self.counts["finished"] += 1
            self.counts["completion_tokens"] += len(record["tokens"])
            self.counts["accepted"] += record.get("accepted", 0)
            self.counts["evaluated"] += record.get("evaluated", 0)
        self.post(req, ("done", record))

    def run(self):
        """The engine thread: serve() until the queue closes; a failure inside it is logged and every
        request in flight or waiting gets a 500."""
        try:
            serve(self.engine, self.queue, self.tokenizer.eos_ids, self.s, self.on_finish, on_tokens=self.on_tokens,
                  decode=self.decode)
        except BaseException as e:
            traceback.print_exc()
            print(f"error: the engine failed: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr, flush=True)
            self.fail_all(500, f"the engine failed ({type(e).__name__}); the server is exiting", e)
        finally:
            self.loop_done.set()

    def fail_all(self, status, message, failure=None):
        with self.lock:
            if failure is not None:
                self.failed = failure
            pending = list(self.events.values())
        self.queue.close()
        for req, events in pending:
            req.cancelled = True
            events.put(("error", status, message))

    def health(self) -> dict:
        with self.lock, self.queue.cond:
            c, waiting = dict(self.counts), len(self.queue.waiting)
            running = len(self.running)
        status = "failed" if self.failed is not None else "draining" if self.draining else "ok"
        sa = self.engine.sa
        return dict(status=status, model=self.model_name, slots=self.engine.batch_size, running=running,
                    waiting=waiting, requests_finished=c["finished"], requests_cancelled=c["cancelled"],
                    completion_tokens=c["completion_tokens"], speculate=sa.mode,
                    gamma=sa.gamma if sa.mode != "none" else None, accepted=c["accepted"], evaluated=c["evaluated"],
                    acceptance=c["accepted"] / c["evaluated"] if c["evaluated"] else None)


# ---------------------------------------------------------------- the HTTP side

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked server-sent events
    server_version = "magicdec-server"

    @property
    def state(self) -> Server:
        return self.server.state

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorize(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise ApiError(401, "missing or incorrect API key (Authorization: Bearer <--api_key>)",
                           code="invalid_api_key")

    def read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # whatever body follows is not read
            raise ApiError(411, "a request body with a Content-Length is needed")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
        data = self.rfile.read(int(length))
        try:
            return json.loads(data, parse_constant=G.refuse_constant)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON ({getattr(e, 'msg', e)})", code="invalid_json") \
                from None

    def do_GET(self):
        try:
            if self.path == "/health":
                return self.send_json(200, self.state.health())
            if self.path == "/v1/models":
                self.authorize()
                return self.send_json(200, {"object": "list", "data": [
                    {"id": self.state.model_name, "object": "model", "created": self.server.created,
                     "owned_by": "local"}]})
            if self.path in FIELDS:
                raise ApiError(405, f"{self.path} takes POST")
            raise ApiError(404, f"no such endpoint: GET {self.path}", code="not_found")
        except ApiError as e:
            self.send_json(e.status, e.body())

    def do_POST(self):
        try:
            if self.path not in FIELDS:
                self.close_connection = True
                raise ApiError(404, f"no such endpoint: POST {self.path}", code="not_found")
            body = self.read_json()
            self.authorize()
            st = self.state
            req, stream, include_usage = parse_request(
                body, self.path, tokenizer=st.tokenizer, model_name=st.model_name, s=st.s,
                max_seq_len=st.engine.max_seq_len, max_new_tokens=st.max_new_tokens)
            events = st.submit(req)
        except ApiError as e:
            return self.send_json(e.status, e.body())
        except Exception as e:  # a fault of the server's own, before anything queued: logged, and a 500
            traceback.print_exc()
            return self.send_json(500, ApiError(500, f"internal error ({type(e).__name__})").body())
        with st.lock:
            st.handlers += 1
        try:
            (self.stream if stream else self.whole)(req, events, self.path == "/v1/chat/completions", include_usage)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            st.cancel(req)
            self.close_connection = True
        finally:
            st.forget(req)
            with st.lock:
                st.handlers -= 1

    def client_gone(self) -> bool:
        """Whether the client closed its connection: readable with nothing to read (it sends nothing
        more while it waits for the answer)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def next_event(self, req, events):
        """The request's next event; None once its client has gone (the request is then cancelled).
        The client is looked at every POLL_S, events or not: a request that is not streamed hears
        nothing from its client's side otherwise."""
        while True:
            now = time.monotonic()
            if now >= getattr(self, "next_look", 0):
                self.next_look = now + POLL_S
                if self.client_gone():
                    self.state.cancel(req)
                    self.close_connection = True
                    return None
            try:
                return events.get(timeout=POLL_S)
            except queue.Empty:
                pass

    def usage(self, req, record):
        n = len(record["tokens"])
        return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}

    def ended_early(self, event):
        """An event that ends a request without an answer -> (status, message), else None."""
        if event[0] == "error":
            return event[1], event[2]
        if event[0] == "done" and event[1]["finish_reason"] == "cancelled":
            return 503, "the server shut down before the request finished"
        return None

    def whole(self, req, events, chat, include_usage):
        while True:
            event = self.next_event(req, events)
            if event is None:
                return
            early = self.ended_early(event)
            if early is not None:
                status, message = early
                return self.send_json(status, ApiError(status, message).body())
            if event[0] == "done":
                break
        record, created = event[1], int(time.time())
        text, reason = record["text"], record["finish_reason"]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        self.send_json(200, {"id": req.id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.state.model_name, "choices": [choice],
                             "usage": self.usage(req, record)})

    def send_chunk(self, obj):
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def stream(self, req, events, chat, include_usage):
        """Server-sent events: a chunk per round with the text that round made, the last with the
        finish_reason, then (with include_usage) the usage, then [DONE]. Text that could still turn
        out to begin a stop string, or that ends inside a UTF-8 character, waits for the next round."""
        created, name = int(time.time()), self.state.model_name
        kind = "chat.completion.chunk" if chat else "text_completion"
        hold = max(map(len, req.stop), default=1) - 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

        def chunk(text, reason=None, role=False):
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            self.send_chunk({"id": req.id, "object": kind, "created": created, "model": name, "choices": [choice]})

        tokens, sent, started = [], "", False
        while True:
            event = self.next_event(req, events)
            if event is None:
                return
            early = self.ended_early(event)
            if early is not None:
                self.send_chunk(ApiError(*early).body())
                break
            if not started and chat:
                chunk("", role=True)
            started = True
            if event[0] == "tokens":
                tokens += event[1]
                text = text_until_stop(self.state.decode(tokens), req.stop)[0].rstrip("\ufffd")
                text = text[:len(text) - hold] if hold else text
                if len(text) > len(sent):
                    chunk(text[len(sent):])
                    sent = text
                continue
            record = event[1]
            final = record["text"]
            chunk(final[len(sent):] if final.startswith(sent) else "", record["finish_reason"])
            if include_usage:
                self.send_chunk({"id": req.id, "object": kind, "created": created, "model": name, "choices": [],
                                 "usage": self.usage(req, record)})
            break
        self.send_chunk(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a keep-alive connection's thread idles in a read: it must not hold up the exit
    allow_reuse_address = True


# ---------------------------------------------------------------- the command line

def parse_args(argv=None):
    p = G.parser(serving=True, description="An OpenAI-compatible HTTP server over continuous batching "
                                           "(POST /v1/completions, /v1/chat/completions; GET /v1/models, /health).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0-65535; 0: any free port (the ready line names it)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait for a slot, >= 1; one more is refused at once with 429")
    p.add_argument("--shutdown_timeout", type=float, default=5.0,
                   help="seconds the requests in flight get to finish after SIGINT/SIGTERM before they are cut off "
                        "(with a 503), >= 0")
    p.add_argument("--api_key", default=os.environ.get("SERVER_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (default: $SERVER_API_KEY; unset: no check)")
    args = G.parse_args(argv, p)
    if not 0 <= args.port <= 65535:
        raise G.UsageError(f"--port must be in 0-65535 (got {args.port})")
    if args.max_queue < 1:
        raise G.UsageError(f"--max_queue must be >= 1 (got {args.max_queue})")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise G.UsageError(f"--shutdown_timeout must be finite and >= 0 (got {args.shutdown_timeout})")
    if args.api_key is not None and not args.api_key:
        raise G.UsageError("--api_key must not be empty")
    return args


@torch.no_grad()
def warm_up(engine, tokenizer, s):
    """Compiles every step a stream uses (refill, and each decode round) before the first client waits
    for it; with CUDA graphs, captures each step for every sampling kind (spec.KINDS) a request may bring."""
    prompt = G.prompt_ids(tokenizer, "Hello, world.") or [0]
    width = engine.sa.ring_gamma + 1 if engine.sa.mode != "none" else 1
    kinds = [Sampling(), Sampling(1.0), Sampling(1.0, top_k=50)] if engine.graphs is not None else [s]
    for k in kinds:
        requests = [Request(f"warm-{i}", prompt, min(2 * width + 1, engine.max_seq_len - len(prompt)), sampling=k)
                    for i in range(engine.batch_size + 1)]
        serve(engine, requests, {-1}, s, lambda req, record: None)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, cfg, dcfg, tokenizer, say = G.setup(args)
    if args.max_seq_len > cfg.block_size:
        say(f"warning: --max_seq_len {args.max_seq_len} is past the model's trained context of {cfg.block_size}; "
            f"text beyond it may degrade", file=sys.stderr)
    try:  # bound before the weights load: a taken port is one line at once
        httpd = HTTPServer((args.host, args.port), Handler)
    except OSError as e:
        raise G.UsageError(f"--host {args.host} --port {args.port}: {e.strerror or e}") from None
    try:
        engine = G.load_engine(args, cfg, dcfg, device=device, dtype=dtype, batch=args.batch_size,
                               max_seq_len=args.max_seq_len, longest_prompt=args.max_seq_len // 2, streams=True,
                               say=say)
        s = Sampling(args.temperature, args.top_k, args.top_p)
        if args.compile:
            warm_up(engine, tokenizer, s)
        name = os.path.basename(os.path.normpath(args.checkpoint_path))
        state = Server(engine, tokenizer, s, model_name=name, max_queue=args.max_queue,
                       max_new_tokens=args.max_new_tokens)
        httpd.state, httpd.api_key, httpd.created = state, args.api_key, int(time.time())
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
        threading.Thread(target=state.run, name="engine", daemon=True).start()
        threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.1), name="http", daemon=True).start()
        host, port = httpd.server_address[:2]
        spec = "autoregressive" if engine.sa.mode == "none" else f"--speculate {engine.sa.mode} gamma {engine.sa.gamma}"
        say(f"serving {name} on http://{host}:{port} ({engine.batch_size} slots, {engine.max_seq_len} positions "
            f"each, {spec}, {device}, {dtype})", flush=True)
        while not stop.is_set() and not state.loop_done.is_set():
            stop.wait(0.2)
        return shut_down(state, httpd, say, args.shutdown_timeout)
    finally:
        httpd.server_close()


def shut_down(state: Server, httpd, say, timeout) -> int:
    """Stop taking requests; let those in flight finish for up to timeout seconds, then cut them off;
    give their handlers a moment to answer -> the exit code: 1 if the engine failed, else 0."""
    if state.failed is None:
        with state.lock:
            state.draining, n = True, len(state.events)
        say(f"stopping: {n} request(s) in flight get {timeout:g} s to finish", file=sys.stderr, flush=True)
        state.queue.close()
        if not state.loop_done.wait(timeout):
            state.fail_all(503, "the server shut down before the request finished")
            state.loop_done.wait(5.0)  # the round under way ends, then the loop sees every row cancelled
    deadline = time.monotonic() + 2.0
    while state.handlers and time.monotonic() < deadline:  # their answers (or 500s) go out
        time.sleep(0.02)
    httpd.shutdown()
    return 1 if state.failed is not None else 0


def cli(argv=None) -> int:
    """main() with its errors as one line on stderr: exit code 2 for bad flags, 1 for a failure after
    loading began (the engine failing while serving included), 130 for Ctrl-C while loading."""
    try:
        return main(argv)
    except G.UsageError as e:
        message, code = f"error: {e}", 2
    except (ValueError, MemoryError, OSError) as e:
        message, code = f"error: {e}".replace("\n", " "), 1
    except KeyboardInterrupt:
        message, code = "error: stopped by SIGINT", 130
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(cli())
