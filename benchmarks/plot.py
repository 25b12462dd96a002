# PNGs from benchmarks/sweep.py JSONs, a benchmarks/acceptance.py JSON (acceptance only) or a
# benchmarks/stream.py JSON (the stream only):
#   speedup_vs_batch.png       best SD speedup over AR against batch size, one line per prefix length
#   acceptance_vs_budget.png   acceptance per draft token against draft budget, StreamingLLM vs SnapKV
#   predicted_vs_measured.png  speedup predicted from measured step ratios and acceptance against measured
#   stream_throughput.png      tokens finished over time: static waves and continuous batching, AR and SD
# Needs matplotlib (pip install matplotlib), which only this script and its test use.
#   python -m benchmarks.plot benchmarks/results/sweep-<time>.json [more sweep JSONs] [--out benchmarks/plots]
# Several sweep JSONs (one per batch size and prefix, say) are plotted together, titled by the first.
import argparse
import glob
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND_LABEL = {"streaming": "StreamingLLM", "snapkv": "SnapKV", "full": "full cache"}


def is_acceptance(data):
    return "prompt_len" in data and "results" in data


def title(data, what):
    env = data.get("env", data)  # older acceptance.py JSONs keep commit and date at the top
    if is_acceptance(data):  # device-independent, labelled by its settings
        return (f"{what}\n{data['prompt_len']}-token prompts, gamma {data['gamma']}, {data['dtype']}, "
                f"{(env.get('commit') or '')[:8]}, {env.get('date', '')[:10]}")
    return (f"{what}\n{env.get('device', '?')}, {data['settings'].get('dtype', '')}, "
            f"{'compiled' if data['settings'].get('compile') else 'eager'}, {(env.get('commit') or '')[:8]}, {env.get('date', '')[:10]}")


def acceptance_records(data):
    """acceptance.py results with the defaults (refresh on; SnapKV's recent window budget/2), in the
    sweep's record form."""
    return [dict(r, prefix=data["prompt_len"]) for r in data["results"]
            if r["refresh"] and r["snapkv_recent"] in (None, r["budget"] // 2)]


def prompt_sets(r, pools):
    """The lines a record belongs to: rows as many as its batch (None), and the prompt pool it ran
    through in several batches, or equals as one batch."""
    n = r.get("prompts", r["batch_size"])
    return ([None] if n == r["batch_size"] else []) + [p for p in pools if p == n]


def speedup_vs_batch(plt, data, records, out):
    fig, ax = plt.subplots(figsize=(6, 4))
    pools = {}  # (prefix, new tokens) -> the prompt pools some batch size of it ran through in several batches
    for r in records:
        if r.get("prompts", r["batch_size"]) > r["batch_size"]:
            pools.setdefault((r["prefix"], r.get("new_tokens")), set()).add(r["prompts"])
    lines = sorted({(r["prefix"], r.get("new_tokens"), p) for r in records
                    for p in prompt_sets(r, pools.get((r["prefix"], r.get("new_tokens")), ()))},
                   key=lambda x: (x[0], x[1] or 0, x[2] or 0))
    for S, n, pool in lines:
        best = {}
        for r in records:
            if (r["prefix"], r.get("new_tokens")) == (S, n) and pool in prompt_sets(r, pools.get((S, n), ())):
                best[r["batch_size"]] = max(best.get(r["batch_size"], 0.0), r["speedup"])
        batches = sorted(best)
        label = (f"prefix {S}" + (f", {n} new tokens" if len({x[1] for x in lines}) > 1 else "")
                 + (f", the same {pool} prompts" if pool else ""))
        ax.plot(batches, [best[b] for b in batches], marker="o", linestyle="--" if pool else "-", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    log2_ticks(ax, {r["batch_size"] for r in records})
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over AR (best budget, gamma)")
    ax.set_title(title(data, "Speculative decoding speedup"), fontsize=9)
    ax.legend()
    return save(fig, out, "speedup_vs_batch.png")


def acceptance_vs_budget(plt, data, records, out):
    fig, ax = plt.subplots(figsize=(6, 4))
    prefixes = sorted({r["prefix"] for r in records})
    styles = ["-", "--", ":", "-."]
    for kind in sorted({r["draft_kv"] for r in records if r["budget"]}):
        for i, S in enumerate(prefixes):
            # acceptance per token hardly depends on gamma or batch size: average them out
            by_budget = {}
            for r in records:
                if r["draft_kv"] == kind and r["prefix"] == S and r["budget"]:
                    by_budget.setdefault(r["budget"], []).append(r["acceptance"])
            budgets = sorted(by_budget)
            ax.plot(budgets, [statistics.mean(by_budget[b]) for b in budgets], marker="o", linestyle=styles[i % len(styles)],
                    color="C0" if kind == "streaming" else "C1", label=f"{KIND_LABEL.get(kind, kind)}, prefix {S}")
    log2_ticks(ax, {r["budget"] for r in records if r["budget"]})
    ax.set_ylim(0, 1)
    ax.set_xlabel("draft budget (KV entries)")
    ax.set_ylabel("acceptance per draft token")
    ax.set_title(title(data, "Acceptance vs draft budget"), fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, out, "acceptance_vs_budget.png")


def predicted_vs_measured(plt, data, records, out):
    fig, ax = plt.subplots(figsize=(5, 5))
    y = [r["speedup"] for r in records]
    xs = [[r["predicted_speedup"] for r in records]]
    ax.scatter(xs[0], y, s=12, label="measured T_D/T_T, T_V/T_T; Omega from acceptance")
    if all(r.get("new_tokens") and r.get("rounds") for r in records):  # the rounds the batch took, slowest row included
        # rounds are summed over the batches a prompt pool runs in
        xs.append([(r["new_tokens"] - 1) * r.get("prompts", r["batch_size"]) / r["batch_size"] / r["rounds"]
                   / (r["gamma"] * r["t_draft_over_t_target"] + r["t_verify_over_t_target"]) for r in records])
        ax.scatter(xs[-1], y, s=12, marker="s", label="measured ratios; tokens per round of the batch")
    if all("model_speedup" in r for r in records):
        xs.append([r["model_speedup"] for r in records])
        ax.scatter(xs[-1], y, s=12, marker="x", label="cost model")
    hi = max([v for x in xs for v in x] + y + [1.0]) * 1.05
    ax.plot([0, hi], [0, hi], color="grey", linewidth=0.8)
    ax.fill_between([0, hi], [0, hi * 0.8], [0, hi * 1.2], color="grey", alpha=0.12, label="within 20%")
    ax.set_xlabel("predicted speedup (MagicDec model)")
    ax.set_ylabel("measured speedup")
    ax.set_title(title(data, "Speedup model against measurement"), fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, out, "predicted_vs_measured.png")


def is_stream(data):
    return "runs" in data and data["runs"] and "timeline" in data["runs"][0]


def stream_throughput(plt, data, out):
    """Cumulative generated tokens of finished requests against time, one line per mode (cycle 0)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"ar-static": ("tab:blue", ":"), "ar-continuous": ("tab:blue", "-"), "sd-static": ("tab:red", ":"),
             "sd-continuous": ("tab:red", "-")}
    for r in data["runs"]:
        if r["cycle"] != 0:
            continue
        t, n = zip(*([(0.0, 0)] + [tuple(x) for x in r["timeline"]]))
        color, line = style.get(r["mode"], ("gray", "-"))
        ax.step(t, n, where="post", color=color, linestyle=line,
                label=f"{r['mode']} ({r['tokens_per_s']:.1f} tok/s)")
    st = data["settings"]
    ax.set_xlabel("seconds since the stream began")
    ax.set_ylabel("tokens of finished requests")
    ax.set_title(f"{st['requests']} requests through {st['slots']} slots, {data.get('device', '')}", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, out, "stream_throughput.png")


def log2_ticks(ax, values):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(values), [str(v) for v in sorted(values)])
    ax.minorticks_off()


def save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Plots from bench_sweep.py JSONs or an acceptance.py JSON.")
    p.add_argument("json", nargs="*", help="default: the newest benchmarks/results/sweep-*.json")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "plots"))
    p.add_argument("--speculate", default="self", choices=["self", "draft"], help="which speculation mode to plot")
    args = p.parse_args(argv)
    paths = args.json or [max(glob.glob(os.path.join(ROOT, "benchmarks", "results", "sweep-*.json")), key=os.path.getmtime,
                              default=None)]
    if paths == [None]:
        sys.exit("error: no sweep JSON given and none under benchmarks/results/")
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = []
    for path in paths:
        with open(path) as f:
            datas.append(json.load(f))
    data = datas[0]
    os.makedirs(args.out, exist_ok=True)
    if is_acceptance(data):
        return [acceptance_vs_budget(plt, data, acceptance_records(data), args.out)]
    if is_stream(data):
        return [stream_throughput(plt, data, args.out)]
    records = [dict(r, new_tokens=d.get("settings", {}).get("max_new_tokens")) for d in datas for r in d["sd"]
               if r["speculate"] == args.speculate]
    if not records:
        sys.exit(f"error: {', '.join(paths)} hold no --speculate {args.speculate} results")
    return [speedup_vs_batch(plt, data, records, args.out), acceptance_vs_budget(plt, data, records, args.out),
            predicted_vs_measured(plt, data, records, args.out)]


if __name__ == "__main__":
    main()
