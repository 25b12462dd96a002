"""Serving over HTTP: server.py driven through its OpenAI API at several request rates, autoregressive
against self-speculation at the same slot counts: the latency-throughput curve MagicDec is about.

    python -m benchmarks.serving [--slots 4,8] [--rates 0.5,1,2,inf] [--requests 24]
                                 [--prompt_lens 256,1024] [--new_tokens 32,128] [--compile]
    python -m benchmarks.serving --quick          (a smoke run: 2 slots, 2 rates, 4 short requests)

One server process per mode (ar; sd: --speculate self) and slot count, the two side by side (an
idle one sleeps), taking turns at each rate, --cycles times: the CPU's drift falls on both alike, and
SD/AR ratios are taken within a cycle, then the median over cycles. For each rate, --requests
requests arrive as a Poisson process (exponential gaps at that mean rate per second; inf: all at
once), each an essay stretch (token ids: exact lengths) with prompt length and max_tokens drawn
uniformly from the given ranges (--seed, recorded; the same requests for every server and rate),
streamed with include_usage over the OpenAI wire format (server-sent events), read by a client of
the standard library's http.client, which runs wherever the server does (a GPU machine without the
openai package; tests/test_server.py speaks to the server through the openai client itself). Per rate:
  throughput    completion tokens and requests over the wall time from the first send to the last answer
  TTFT          send -> first text;  TPOT: (last chunk - first text) / (completion tokens - 1)
  latency       send -> last chunk;  p50, p90, p99 and mean of each
  acceptance    accepted / evaluated drafts over the rate's requests, from the server's /health
The JSON goes under benchmarks/results/, the plot (throughput against p50 TPOT, one curve per mode,
a point per slot count at the highest rate, medians over cycles; MagicDec's Figure 1 layout) under
benchmarks/plots/.
"""
import argparse
import http.client
import json
import math
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from benchmarks.common import (RESULTS, ROOT, SMOLLM2, cpu_counters, cpu_stolen_since, environment, essay_prompts,
                               ints, write_json)
from tokenizer import load_tokenizer

PLOTS = os.path.join(ROOT, "benchmarks", "plots")
MODES = {"ar": [], "sd": ["--speculate", "self"]}


def make_requests(tokenizer, n, prompt_lens, new_tokens, seed):
    """n (prompt ids, max_tokens): lengths drawn uniformly from (lo, hi) ranges, each prompt its own essay stretch."""
    rng = random.Random(seed)
    lens = [rng.randint(*prompt_lens) for _ in range(n)]
    news = [rng.randint(*new_tokens) for _ in range(n)]
    texts = essay_prompts(tokenizer, n, max(lens), overlap=True)
    return [(t[:m], k) for t, m, k in zip(texts, lens, news)]


class Server:
    """server.py as a subprocess on a free loopback port, until stop()."""

    def __init__(self, flags, log_dir, ready_timeout):
        self.log = open(os.path.join(log_dir, f"server-{time.monotonic_ns()}.err"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--port", "0", *flags],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline, line = time.monotonic() + ready_timeout, ""
        try:
            while not line.startswith("serving "):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server.py {' '.join(flags)} did not start: {open(self.log.name).read()[-2000:]}")
                if select.select([self.proc.stdout], [], [], 0.5)[0]:
                    line = self.proc.stdout.readline()
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{int(line.split('http://127.0.0.1:')[1].split()[0])}"
        self.ready_line = line.strip()

    def health(self):
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def stream_completion(url, model, prompt, max_tokens):
    """POST /v1/completions with stream: true -> each server-sent event's JSON object, up to [DONE]
    (an error event raises)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    try:
        body = dict(model=model, prompt=prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        for line in r:  # http.client undoes the chunked transfer encoding
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            yield event
    finally:
        conn.close()


def one_request(url, model, prompt, max_tokens, out):
    t_send, t_first, n, error = time.perf_counter(), None, 0, None
    try:
        for chunk in stream_completion(url, model, prompt, max_tokens):
            if t_first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                t_first = time.perf_counter()
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    except Exception as e:  # an answer that failed is counted, not timed
        error = f"{type(e).__name__}: {e}"
    t_end = time.perf_counter()
    t_first = t_end if t_first is None else t_first
    out.update(send=t_send, ttft=t_first - t_send, e2e=t_end - t_send, end=t_end, tokens=n, error=error,
               tpot=(t_end - t_first) / (n - 1) if n > 1 else None)


def percentiles(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    p50, p90, p99 = np.percentile(xs, [50, 90, 99]).tolist()
    return dict(p50=p50, p90=p90, p99=p99, mean=float(np.mean(xs)))


def drive(server, model, requests, rate, seed):
    """The requests at Poisson arrivals of the given mean rate -> the rate's record."""
    rng = random.Random(seed)
    before = server.health()
    outs, threads = [{} for _ in requests], []
    t0 = time.perf_counter()
    at = 0.0
    for (prompt, max_tokens), out in zip(requests, outs):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        t = threading.Thread(target=one_request, args=(server.url, model, prompt, max_tokens, out))
        t.start()
        threads.append(t)
        at += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    for t in threads:
        t.join()
    after = server.health()
    ok = [o for o in outs if o["error"] is None]
    seconds = max(o["end"] for o in outs) - min(o["send"] for o in outs)
    tokens = sum(o["tokens"] for o in ok)
    accepted, evaluated = after["accepted"] - before["accepted"], after["evaluated"] - before["evaluated"]
    return dict(rate=rate if math.isfinite(rate) else "inf", requests=len(requests), completed=len(ok), errors=[o["error"] for o in outs if o["error"]],
                seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds, requests_per_s=len(ok) / seconds,
                ttft_s=percentiles([o["ttft"] for o in ok]), tpot_s=percentiles([o["tpot"] for o in ok]),
                e2e_s=percentiles([o["e2e"] for o in ok]),
                acceptance=accepted / evaluated if evaluated else None,
                per_request=[dict(prompt_tokens=len(p), max_tokens=m, tokens=o["tokens"], ttft_s=o["ttft"],
                                  tpot_s=o["tpot"], e2e_s=o["e2e"]) for (p, m), o in zip(requests, outs)])


def plot(record, out_dir):
    """Throughput against p50 TPOT: one curve per mode through its slot counts at the highest rate
    (MagicDec Figure 1), the other rates as faint points. -> the PNG's path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    label = {"ar": "autoregressive", "sd": "self-speculation"}
    for mode, color in (("ar", "tab:blue"), ("sd", "tab:red")):
        points = {}  # (slots, rate) -> [(tokens/s, p50 TPOT ms)] over cycles
        for r in record["runs"]:
            if r["mode"] == mode and r["tpot_s"]:
                points.setdefault((r["slots"], r["rate"]), []).append((r["tokens_per_s"], 1e3 * r["tpot_s"]["p50"]))
        if not points:
            continue
        med = {k: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) for k, v in points.items()}
        ax.scatter([x for x, _ in med.values()], [y for _, y in med.values()], color=color, alpha=0.25, s=14)
        top = max((rate for _, rate in med), key=float)  # "inf": all at once
        line = sorted((slots, xy) for (slots, rate), xy in med.items() if rate == top)
        ax.plot([xy[0] for _, xy in line], [xy[1] for _, xy in line], "o-", color=color, label=label[mode])
        for slots, (x, y) in line:
            ax.annotate(f"{slots} slots", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    s = record["settings"]
    ax.set_xlabel("throughput (completion tokens/s)")
    ax.set_ylabel("p50 time per output token (ms)")
    ax.set_title(f"Serving over HTTP: {s['dtype']}, {'compiled' if s['compile'] else 'eager'}, prompts "
                 f"{s['prompt_lens']}, new {s['new_tokens']}\n{record['device']}, {(record.get('commit') or '')[:8]}",
                 fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "serving_throughput_vs_tpot.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", default=SMOLLM2)
    p.add_argument("--modes", default="ar,sd")
    p.add_argument("--slots", default="4,8")
    p.add_argument("--rates", default="0.5,1,2,inf", help="mean requests per second; inf: all at once")
    p.add_argument("--requests", type=int, default=24, help="requests per rate")
    p.add_argument("--prompt_lens", default="256,1024", help="lo,hi: prompt lengths drawn uniformly")
    p.add_argument("--new_tokens", default="32,128", help="lo,hi: max_tokens drawn uniformly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycles", type=int, default=2, help="turns of every rate and mode; ratios are medians over them")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--draft_budget", type=int, default=256)
    p.add_argument("--prefill_chunk", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--ready_timeout", type=float, default=1800, help="seconds a server may take to load and compile")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 slots, rates 4 and inf, 4 short requests")
    p.add_argument("--json", default=None)
    p.add_argument("--plots", default=PLOTS, help="directory of the plot ('': none)")
    args = p.parse_args(argv)
    if args.quick:
        args.slots, args.rates, args.requests, args.prompt_lens, args.new_tokens = "2", "4,inf", 4, "16,48", "4,12"
        args.cycles = 1
        args.draft_budget, args.prefill_chunk = 24, 64
    rates = [float(x) for x in args.rates.split(",")]
    lo_hi = [tuple(int(x) for x in r.split(",")) for r in (args.prompt_lens, args.new_tokens)]
    tokenizer = load_tokenizer(args.checkpoint_path)
    requests = make_requests(tokenizer, args.requests, *lo_hi, args.seed)
    max_seq_len = lo_hi[0][1] + lo_hi[1][1]
    common_flags = ["--checkpoint_path", args.checkpoint_path, "--device", args.device, "--dtype", args.dtype,
                    "--max_seq_len", str(max_seq_len), "--prefill_chunk", str(args.prefill_chunk),
                    "--max_queue", str(max(args.requests, 1)), *(["--compile"] if args.compile else [])]
    sd_flags = ["--gamma", str(args.gamma), "--draft_budget", str(args.draft_budget),
                "--sinks", str(min(16, args.draft_budget // 4))]
    runs, servers = [], []
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as logs:
        for slots in ints(args.slots):
            # the modes' servers run side by side (an idle one sleeps) and take turns at each rate,
            # so that the CPU's drift falls on both alike
            up = {}
            try:
                for mode in modes:
                    flags = common_flags + ["--batch_size", str(slots)] + (MODES[mode] + sd_flags if mode == "sd" else [])
                    t = time.perf_counter()
                    server = up[mode] = Server(flags, logs, args.ready_timeout)
                    startup_s = time.perf_counter() - t
                    with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as r:
                        server.model = json.loads(r.read())["data"][0]["id"]
                    one_request(server.url, server.model, requests[0][0], 2, {})  # the first request's one-off costs
                    servers.append(dict(mode=mode, slots=slots, startup_s=startup_s, ready_line=server.ready_line))
                for cycle in range(args.cycles):
                    for i, rate in enumerate(rates):
                        for mode in modes:
                            server, stolen = up[mode], cpu_counters()
                            rec = dict(mode=mode, slots=slots, cycle=cycle,
                                       **drive(server, server.model, requests, rate, args.seed + i),
                                       cpu_stolen=cpu_stolen_since(stolen))
                            runs.append(rec)
                            tpot = rec["tpot_s"]["p50"] * 1e3 if rec["tpot_s"] else float("nan")
                            acc = f", acceptance {rec['acceptance']:.2f}" if rec["acceptance"] is not None else ""
                            print(f"cycle {cycle} {mode} {slots} slots, rate {rec['rate']}/s: {rec['tokens_per_s']:.1f} "
                                  f"tokens/s, {rec['requests_per_s']:.2f} requests/s, TTFT p50 {rec['ttft_s']['p50']:.2f} "
                                  f"s, TPOT p50 {tpot:.1f} ms{acc}", flush=True)
            finally:
                for server in up.values():
                    server.stop()

    def ratios(slots, rate, key):
        """SD over AR within each cycle -> (median, per cycle), or None."""
        per_cycle = []
        for c in range(args.cycles):
            pair = {r["mode"]: r for r in runs if r["slots"] == slots and float(r["rate"]) == rate and r["cycle"] == c}
            if "ar" in pair and "sd" in pair and pair["ar"]["tpot_s"] and pair["sd"]["tpot_s"]:
                a, s = pair["ar"][key], pair["sd"][key]
                per_cycle.append(s / a if key == "tokens_per_s" else s["p50"] / a["p50"])
        return (statistics.median(per_cycle), per_cycle) if per_cycle else (None, [])

    summary = []
    for b in ints(args.slots):
        for r in rates:
            (tput, tput_cycles), (tpot, tpot_cycles) = ratios(b, r, "tokens_per_s"), ratios(b, r, "tpot_s")
            summary.append(dict(slots=b, rate=r if math.isfinite(r) else "inf", sd_over_ar_tokens_per_s=tput,
                                sd_over_ar_tokens_per_s_cycles=tput_cycles, sd_over_ar_tpot_p50=tpot,
                                sd_over_ar_tpot_p50_cycles=tpot_cycles))
            if tput is not None:
                print(f"{b} slots, rate {summary[-1]['rate']}/s: SD/AR throughput {tput:.2f}, p50 TPOT {tpot:.2f} "
                      f"(medians of {len(tput_cycles)} cycles)")
    record = dict(environment(args.device), settings=vars(args), client="http.client", servers=servers, runs=runs,
                  summary=summary)
    path = args.json or os.path.join(RESULTS, f"serving-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, record)
    if args.plots:
        plot(record, args.plots)
    return path


if __name__ == "__main__":
    main()
