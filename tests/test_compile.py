# Compiled steps (Engine(compile=True): one compiled transformer block shared by every layer, fullgraph,
# static shapes) on tiny random models: output equals eager token for token, nothing breaks the
# graphs, the number of compiled graphs is pinned per setup, and after one warm-up generation other
# prompts, lengths and acceptance compile nothing more.
#
# Inductor builds most setups. A few use the aot_eager backend, which traces the same graphs
# (recompiles and graph breaks are decided before the backend) without inductor's C++ builds.
#
# Where CUDA is available every setup also runs there with inductor, its decode, draft and verify
# steps replayed as CUDA graphs, and speculation must equal AR there too.
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from generate import Engine, SpecArgs, generate
from model import place
from spec import Sampling

MAX_NEW, MAX_SEQ, CHUNK = 24, 96, 32
SAMPLE = Sampling(temperature=1.0, top_k=20, top_p=0.95)
# (backend, speculation, attention, sampling, graphs): every graph is one shape of the shared block:
# prefill chunk and decode step; prefill, draft step and verify step; a standalone draft adds its
# own prefill and a 2-token catch-up draft step.
SETUPS = {
    "autoregressive": ("inductor", None, "sdpa", Sampling(), 2),
    "autoregressive-sampling": ("inductor", None, "sdpa", SAMPLE, 2),
    "self-streaming": ("inductor", SpecArgs("self", 3, "streaming", 24, sinks=4), "sdpa", Sampling(), 3),
    "self-streaming-sampling": ("inductor", SpecArgs("self", 3, "streaming", 24, sinks=4), "sdpa", SAMPLE, 3),
    "self-snapkv": ("inductor", SpecArgs("self", 3, "snapkv", 24, snapkv_window=8), "sdpa", Sampling(), 3),
    "draft-streaming": ("aot_eager", SpecArgs("draft", 3, "streaming", 24, sinks=4, refresh=False), "sdpa",
                        Sampling(), 5),
    "draft-snapkv": ("aot_eager", SpecArgs("draft", 2, "snapkv", 24, snapkv_window=8, refresh=False), "sdpa",
                     Sampling(), 5),
    "self-streaming-flex": ("inductor", SpecArgs("self", 3, "streaming", 24, sinks=4), "flex", Sampling(), 3),
    "draft-snapkv-flex": ("inductor", SpecArgs("draft", 2, "snapkv", 24, snapkv_window=8, refresh=False), "flex",
                          Sampling(), 5),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def on(device, models):
    return tuple(place(copy.deepcopy(m), device, torch.float32) if device != "cpu" else m for m in models)


def prompt_sets(vocab):
    """Three batches of three rows: other lengths, order and content each time (same batch size and
    cache length, which fix the compiled shapes)."""
    g = torch.Generator().manual_seed(5)
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
            for lens in ((7, 61, 26), (40, 5, 66), (33, 12, 50))]


def run(engine, prompts, s, seed):
    torch.manual_seed(seed)
    return generate(engine, prompts, MAX_NEW, {0}, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", SETUPS)
def test_compiled_generation_matches_eager_without_recompiling(tiny, setup, device):
    backend, sa, attn, s, n_graphs = SETUPS[setup]
    backend = "inductor" if device == "cuda" else backend
    target, draft = on(device, tiny)
    draft = draft if sa is not None and sa.mode == "draft" else None
    sets = prompt_sets(target.args.vocab_size)

    def engine(compile, attn=attn, sa=sa):
        return Engine(target, 3, MAX_SEQ, sa, draft, attn, compile, CHUNK, backend=backend)

    eager = engine(False, "sdpa")  # flex must give the same tokens
    want = [run(eager, p, s, seed).tokens for seed, p in enumerate(sets)]
    if device == "cuda" and sa is not None and s == Sampling():  # on CPU, test_spec covers this exhaustively
        assert want == [run(engine(False, "sdpa", None), p, s, 0).tokens for p in sets], "speculation differs from AR"
    torch._dynamo.reset()  # count this setup's graphs from scratch
    counters.clear()
    compiled = engine(True)
    runs = [run(compiled, sets[0], s, 0)]  # warm-up: compiles every step this setup uses
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == n_graphs, f"{graphs} compiled graphs, expected {n_graphs}"
    with torch.compiler.set_stance("fail_on_recompile"):
        runs += [run(compiled, p, s, seed) for seed, p in enumerate(sets[1:], 1)]
    assert counters["stats"]["unique_graphs"] == graphs, "a step compiled again after warm-up"
    assert not counters["graph_break"], dict(counters["graph_break"])
    if device == "cpu" or s == Sampling():  # a CUDA graph draws its random numbers its own way
        assert [r.tokens for r in runs] == want
    if sa is not None and s == Sampling():  # acceptance varies across runs, and rejections happen
        assert len({r.acceptance for r in runs}) > 1 and max(r.acceptance for r in runs) < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_captured_once_across_calls(tiny):
    target, _ = on("cuda", tiny)
    sa = SpecArgs("self", 3, "streaming", 24, sinks=4)
    engine = Engine(target, 3, MAX_SEQ, sa, attn="flex", compile=True, prefill_chunk=CHUNK)
    sets = prompt_sets(target.args.vocab_size)
    first = run(engine, sets[0], Sampling(), 0)
    graphs = dict(engine.graphs)
    assert set(k[0][0] for k in graphs) == {"draft", "verify"}
    second = run(engine, sets[1], Sampling(), 0)
    assert engine.graphs == graphs, "a step was captured again"
    eager = Engine(target, 3, MAX_SEQ, sa, prefill_chunk=CHUNK)
    assert [first.tokens, second.tokens] == [run(eager, p, Sampling(), 0).tokens for p in sets[:2]]
    assert engine.capture_s > 0
