# Continuous batching (generate.serve): a stream of requests through a few slots gives every request
# the tokens it gets alone, a refilled row's draft cache is what a fresh build makes, bad request
# files are refused line by line before any model loads, and a warm stream compiles nothing new.
import json
import threading
import time

import pytest
import torch
from torch._dynamo.utils import counters

import generate as G
from engine import Engine, Request, RequestQueue, SpecArgs, generate, pad_prompts, serve
from spec import Sampling

MAX_SEQ, SLOTS = 112, 4
SETUPS = {
    "ar": None,
    "self-streaming": SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4),
    "self-snapkv": SpecArgs("self", gamma=3, draft_kv="snapkv", draft_budget=24, snapkv_window=8),
    "draft-streaming": SpecArgs("draft", gamma=2, draft_kv="streaming", draft_budget=24, sinks=4, refresh=False),
    "draft-full": SpecArgs("draft", gamma=2, draft_kv="full", refresh=False),
}


def stream(vocab, n=13, seed=3):
    """n requests of 3-70 prompt tokens wanting 1-40 new tokens each."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 70, (n,), generator=g).tolist()
    news = torch.randint(1, 41, (n,), generator=g).tolist()
    return [Request(f"q{i}", torch.randint(3, vocab, (t,), generator=g).tolist(), m)
            for i, (t, m) in enumerate(zip(lens, news))]


def run_stream(engine, requests, eos=frozenset({0})):
    finished = []
    totals = serve(engine, requests, eos, Sampling(), lambda req, rec: finished.append((req, rec)))
    return finished, totals


@pytest.mark.parametrize("setup", SETUPS)
def test_every_request_gets_the_tokens_it_gets_alone(tiny, setup):
    target, draft = tiny
    sa = SETUPS[setup]
    draft = draft if sa is not None and sa.mode == "draft" else None
    requests = stream(target.args.vocab_size)
    finished, totals = run_stream(Engine(target, SLOTS, MAX_SEQ, sa=sa, draft_model=draft), requests)
    assert sorted(r.id for r, _ in finished) == sorted(r.id for r in requests)  # each once
    alone = Engine(target, 1, MAX_SEQ, sa=sa, draft_model=draft)
    for req, rec in finished:
        want = generate(alone, [req.prompt], req.max_new_tokens, {0}, Sampling()).tokens[0]
        assert rec["tokens"] == want, req.id
        assert rec["prompt_tokens"] == len(req.prompt) and 0 <= rec["queue_s"] <= rec["ttft_s"]
    assert totals["tokens"] == sum(len(rec["tokens"]) for _, rec in finished)
    # slots were refilled: later requests waited, and completion order is not submission order
    assert max(rec["queue_s"] for _, rec in finished) > 0
    assert [r.id for r, _ in finished] != [r.id for r in requests]
    if sa is not None:
        assert all(0 <= rec["acceptance"] <= 1 and rec["rounds"] >= 1 for _, rec in finished if len(rec["tokens"]) > 1)


@pytest.mark.parametrize("kind", ["streaming", "snapkv"])
def test_refilled_row_holds_what_a_fresh_build_holds(tiny, kind):
    target, _ = tiny
    sa = SpecArgs("self", gamma=3, draft_kv=kind, draft_budget=24, sinks=4, snapkv_window=8)
    requests = stream(target.args.vocab_size, n=6, seed=4)
    engine = Engine(target, SLOTS, MAX_SEQ, sa=sa)
    run_stream(engine, requests[:5])  # every row has held other prompts and decoded over them
    row, prompt = 2, requests[5].prompt
    engine.refill(row, prompt)
    fresh = Engine(target, 1, MAX_SEQ, sa=sa)
    tokens, lens = pad_prompts([prompt], "cpu")
    fresh.prefill(tokens, lens)
    fresh.setup_draft(tokens, lens)
    for got, want in zip(engine.draft_cache.layers, fresh.draft_cache.layers):
        assert torch.equal(got.slot_pos[row], want.slot_pos[0])
        assert torch.equal(got.k[row], want.k[0]) and torch.equal(got.v[row], want.v[0])
    n = len(prompt)
    for got, want in zip(engine.cache.layers, fresh.cache.layers):
        assert torch.equal(got.k[row, :, :n], want.k[0, :, :n]) and torch.equal(got.v[row, :, :n], want.v[0, :, :n])


class CyclingPlanner:
    """Stands in for the cost model: a new gamma at every re-choice, from the rows it is given."""
    gammas = (1, 2, 3, 4)
    alpha = 0.9

    def __init__(self):
        self.rows_seen = []

    def calibrate(self, *measured):
        self.measured = measured

    def choose_gamma(self, alpha, budget):
        return 2, 1.0

    def choose_gamma_for_rows(self, rows, budget):
        self.rows_seen.append(len(rows))
        return self.gammas[len(self.rows_seen) % len(self.gammas)]


def test_gamma_auto_replans_from_the_active_rows(tiny):
    target, _ = tiny
    planner = CyclingPlanner()
    sa = SpecArgs("self", gamma=2, draft_kv="streaming", draft_budget=24, sinks=4, gamma_max=4, adapt_every=1,
                  planner=planner)
    requests = stream(target.args.vocab_size, n=8, seed=7)
    finished, _ = run_stream(Engine(target, SLOTS, MAX_SEQ, sa=sa), requests)
    alone = Engine(target, 1, MAX_SEQ)
    for req, rec in finished:
        assert rec["tokens"] == generate(alone, [req.prompt], req.max_new_tokens, {0}, Sampling()).tokens[0], req.id
    assert planner.measured and len(planner.rows_seen) > 4 and 0 < min(planner.rows_seen) <= SLOTS


def test_sampled_stream_is_reproducible(tiny):
    target, _ = tiny
    s = Sampling(temperature=1.0, top_k=20)
    sa = SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        finished = []
        serve(Engine(target, SLOTS, MAX_SEQ, sa=sa), stream(target.args.vocab_size, n=6, seed=8), {0}, s,
              lambda req, rec: finished.append((req.id, rec["tokens"])))
        runs.append(finished)
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_warm_stream_compiles_nothing_new(tiny):
    target, _ = tiny
    sa = SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4)
    engine = Engine(target, SLOTS, MAX_SEQ, sa=sa, compile=True, prefill_chunk=32, backend="aot_eager")
    run_stream(engine, stream(target.args.vocab_size, n=6, seed=5))  # warm-up
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        finished, _ = run_stream(engine, stream(target.args.vocab_size, n=9, seed=6))
    assert counters["stats"]["unique_graphs"] == graphs and len(finished) == 9


# ---- the CLI: --requests and --results ----

@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("model loaded before the input was checked")
    monkeypatch.setattr(G, "load_model", refuse)


@pytest.mark.parametrize("lines,expected", [
    (['{"prompt": "hi"}', "{not json"], "line 2: not valid JSON"),
    (['{"prompt": "hi"}', '["a list"]'], "line 2: expected a JSON object"),
    (['{"id": 3}'], "line 1: 'prompt' must be a string"),
    (['{"prompt": 7}'], "line 1: 'prompt' must be a string"),
    (['{"prompt": "hi", "max_new_tokens": 0}'], "line 1: 'max_new_tokens' must be an integer >= 1"),
    (['{"prompt": "hi", "max_new_tokens": -3}'], "line 1: 'max_new_tokens' must be an integer >= 1"),
    (['{"prompt": "hi", "max_new_tokens": "9"}'], "line 1: 'max_new_tokens' must be an integer >= 1"),
    (['{"prompt": "hi", "maxnew": 9}'], "line 1: unknown keys ['maxnew']"),
    (['{"prompt": "hi"}', '{"prompt": ""}'], "line 2 is empty"),
    (['{"prompt": "' + "word " * 40 + '", "max_new_tokens": 8}'], "prompt tokens plus max_new_tokens 8 need"),
    ([""], "no requests"),
])
def test_bad_request_files_refused_by_line(tmp_path, tiny_checkpoint, no_loading, capsys, lines, expected):
    f = tmp_path / "req.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        G.cli(["--checkpoint_path", tiny_checkpoint, "--requests", str(f), "--max_seq_len", "40"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err


def test_unwritable_results_refused_before_work(tmp_path, tiny_checkpoint, no_loading, capsys):
    f = tmp_path / "req.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    for results, expected in ((tmp_path / "missing" / "out.jsonl", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit) as e:
            G.cli(["--checkpoint_path", tiny_checkpoint, "--requests", str(f), "--results", str(results)])
        assert e.value.code == 2 and expected in capsys.readouterr().err


def test_cli_stream_writes_results_in_completion_order(tmp_path, smollm2_dir):
    reqs = [{"prompt": "The capital of France is", "max_new_tokens": 9, "id": "a"},
            {"prompt": "def fibonacci(n):", "max_new_tokens": 3},
            {"prompt": "Once upon a time", "max_new_tokens": 6},
            {"prompt": "List three colors:"}]
    f = tmp_path / "req.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    out = tmp_path / "res.jsonl"
    argv = ["--checkpoint_path", smollm2_dir, "--requests", str(f), "--batch_size", "2", "--max_new_tokens", "5",
            "--results", str(out), "--speculate", "self", "--draft_budget", "24", "--sinks", "4"]
    assert G.cli(argv) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(str(r["id"]) for r in recs) == ["2", "3", "4", "a"]
    assert {str(r["id"]): len(r["tokens"]) for r in recs} == {"a": 9, "2": 3, "3": 6, "4": 5}
    for r in recs:
        assert {"text", "prompt_tokens", "queue_s", "ttft_s", "decode_s", "tokens_per_s", "acceptance", "rounds"} <= set(r)
    assert not (tmp_path / "res.jsonl.partial").exists()


# ---- requests that arrive over time, stop strings, cancellation ----

def letters(ids):
    """A stand-in tokenizer for the tiny vocabulary: one letter per id."""
    return "".join(chr(65 + t % 26) for t in ids)


def test_requests_arriving_while_others_run_get_their_solo_tokens(tiny):
    """A thread submits requests at intervals into a running loop, which sleeps rather than spins
    while nothing waits or runs; every request gets the tokens it gets alone."""
    target, _ = tiny
    requests = stream(target.args.vocab_size, n=8, seed=9)
    queue, finished = RequestQueue(), []
    loop = threading.Thread(target=serve, args=(Engine(target, 2, MAX_SEQ, sa=SETUPS["self-streaming"]), queue, {0},
                                                Sampling(), lambda req, rec: finished.append((req, rec))))
    loop.start()
    for req in requests[:4]:
        queue.submit(req)
        time.sleep(0.02)
    while len(finished) < 4:  # drained: the loop now waits for the next arrival
        time.sleep(0.01)
    clock = time.pthread_getcpuclockid(loop.ident)
    idle = time.clock_gettime(clock)
    time.sleep(0.5)
    idle = time.clock_gettime(clock) - idle
    for req in requests[4:]:
        queue.submit(req)
        time.sleep(0.02)
    queue.close()
    loop.join(timeout=120)
    assert not loop.is_alive() and len(finished) == 8
    assert idle < 0.05, f"the idle loop used {idle:.3f} s of CPU in 0.5 s"
    alone = Engine(target, 1, MAX_SEQ)
    for req, rec in finished:
        assert rec["tokens"] == generate(alone, [req.prompt], req.max_new_tokens, {0}, Sampling()).tokens[0], req.id
        assert rec["finish_reason"] in ("stop", "length") and rec["queue_s"] >= 0


def test_stop_strings_end_a_request_and_are_not_its_text(tiny):
    target, _ = tiny
    req = stream(target.args.vocab_size, n=1, seed=10)[0]
    req.max_new_tokens = 30
    solo = generate(Engine(target, 1, MAX_SEQ), [req.prompt], 30, {-1}, Sampling()).tokens[0]
    text = letters(solo)
    stop = text[12:15]  # ends within the 15th token, or earlier where those letters occur before
    at = text.find(stop)
    finished = []
    req.stop = (stop, "never-" * 3)
    serve(Engine(target, 2, MAX_SEQ, sa=SETUPS["self-streaming"]), [req], {-1}, Sampling(),
          lambda r, rec: finished.append(rec), decode=letters)
    (rec,) = finished
    assert rec["finish_reason"] == "stop" and rec["text"] == text[:at]
    assert rec["tokens"] == solo[:at + len(stop)]  # through the token that completes the stop string


def test_a_cancelled_request_frees_its_slot(tiny):
    target, _ = tiny
    long, short = stream(target.args.vocab_size, n=2, seed=11)
    long.max_new_tokens, short.max_new_tokens = 100, 5
    finished = []

    def on_tokens(req, ids):
        if req is long and len(finished) == 0:
            long.cancelled = True  # as a server does when the client goes away

    queue = RequestQueue([long, short], closed=True)
    serve(Engine(target, 1, MAX_SEQ), queue, {-1}, Sampling(), lambda r, rec: finished.append((r, rec)),
          on_tokens=on_tokens)
    assert [(r.id, rec["finish_reason"]) for r, rec in finished] == [(long.id, "cancelled"), (short.id, "length")]
    assert len(finished[0][1]["tokens"]) < 5 and len(finished[1][1]["tokens"]) == 5


def test_a_full_queue_refuses_and_a_closed_one_too():
    queue = RequestQueue(max_waiting=2)
    reqs = [Request(i, [1, 2], 3) for i in range(4)]
    assert [queue.submit(r) for r in reqs[:3]] == [True, True, False]
    queue.close()
    assert not queue.submit(reqs[3]) and queue.take(wait=True) is reqs[0] and not queue.exhausted()
