# Compiled steps (Engine(compile=True): one compiled transformer block shared by every layer, fullgraph,
# static shapes) on tiny random models: output equals eager token for token, nothing breaks the
# graphs, the number of compiled graphs is pinned per setup, and after one warm-up generation other
# prompts, lengths and acceptance compile nothing more; and none of it changes a compiler setting of
# the process.
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

from engine import Engine, SpecArgs, generate
from model import place, quantized_copy
from spec import Sampling

MAX_NEW, MAX_SEQ, CHUNK = 24, 96, 32
SAMPLE = Sampling(temperature=1.0, top_k=20, top_p=0.95)
# (backend, speculation, attention, sampling, graphs): every graph is one shape of the shared block:
# prefill chunk and decode step; prefill, draft step and verify step; a standalone draft adds its
# own prefill and a 2-token catch-up draft step; a scored verify step adds one.
STREAMING = SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4)
SNAPKV = SpecArgs("self", gamma=3, draft_kv="snapkv", draft_budget=24, snapkv_window=8)
DRAFT_STREAMING = SpecArgs("draft", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4, refresh=False)
DRAFT_SNAPKV = SpecArgs("draft", gamma=2, draft_kv="snapkv", draft_budget=24, snapkv_window=8, refresh=False)
SNAPKV_RESELECT = SpecArgs("self", gamma=3, draft_kv="snapkv", draft_budget=24, snapkv_window=8, reselect=2)
STREAMING_RESELECT = SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=8, reselect=1)
SETUPS = {
    "autoregressive": ("inductor", None, "sdpa", Sampling(), 2),
    "autoregressive-sampling": ("inductor", None, "sdpa", SAMPLE, 2),
    "self-streaming": ("inductor", STREAMING, "sdpa", Sampling(), 3),
    "self-streaming-sampling": ("inductor", STREAMING, "sdpa", SAMPLE, 3),
    "self-snapkv": ("inductor", SNAPKV, "sdpa", Sampling(), 3),
    "draft-streaming": ("aot_eager", DRAFT_STREAMING, "sdpa", Sampling(), 5),
    "draft-snapkv": ("aot_eager", DRAFT_SNAPKV, "sdpa", Sampling(), 5),
    "self-streaming-flex": ("inductor", STREAMING, "flex", Sampling(), 3),
    "self-snapkv-math": ("inductor", SNAPKV, "math", Sampling(), 3),
    "autoregressive-sampling-math": ("inductor", None, "math", SAMPLE, 2),
    "draft-snapkv-flex": ("inductor", DRAFT_SNAPKV, "flex", Sampling(), 5),
    # a scored verify (--draft_reselect) is one more step kind
    "self-snapkv-reselect": ("aot_eager", SNAPKV_RESELECT, "sdpa", Sampling(), 4),
    "self-streaming-reselect-flex": ("inductor", STREAMING_RESELECT, "flex", Sampling(), 3),  # every verify scored
    # a quantized draft (--draft_quantize) is the same three step kinds, its draft step on other modules
    "self-streaming-int8-draft": ("inductor", STREAMING, "sdpa", Sampling(), 3),
    "self-snapkv-int4-draft": ("inductor", SNAPKV, "sdpa", SAMPLE, 3),
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


def compiler_settings():
    return torch._dynamo.config.get_config_copy(), torch._inductor.config.get_config_copy()


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
    if setup.endswith("-draft"):
        scheme = setup.split("-")[-2]
        if scheme == "int4" and device == "cuda":
            pytest.skip("torch's CUDA int4 kernel takes bfloat16 activations; these models are fp32")
        draft = quantized_copy(target, scheme, 32)
    sets = prompt_sets(target.args.vocab_size)

    def engine(compile, attn=attn, sa=sa):
        return Engine(target, 3, MAX_SEQ, sa=sa, draft_model=draft, attn=attn, compile=compile, prefill_chunk=CHUNK,
                      backend=backend)

    eager = engine(False, "sdpa")  # flex must give the same tokens
    want = [run(eager, p, s, seed).tokens for seed, p in enumerate(sets)]
    if device == "cuda" and sa is not None and s == Sampling():  # on CPU, test_spec covers this exhaustively
        assert want == [run(engine(False, "sdpa", None), p, s, 0).tokens for p in sets], "speculation differs from AR"
    torch._dynamo.reset()  # count this setup's graphs from scratch
    counters.clear()
    settings = compiler_settings()
    compiled = engine(True)
    runs = [run(compiled, sets[0], s, 0)]  # warm-up: compiles every step this setup uses
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == n_graphs, f"{graphs} compiled graphs, expected {n_graphs}"
    with torch.compiler.set_stance("fail_on_recompile"):
        runs += [run(compiled, p, s, seed) for seed, p in enumerate(sets[1:], 1)]
    assert counters["stats"]["unique_graphs"] == graphs, "a step compiled again after warm-up"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiler_settings() == settings, "building or running an engine changed a process-wide setting"
    if device == "cpu" or s == Sampling():  # a CUDA graph draws its random numbers its own way
        assert [r.tokens for r in runs] == want
    if sa is not None and s == Sampling():  # acceptance varies across runs, and rejections happen
        assert len({r.acceptance for r in runs}) > 1 and max(r.acceptance for r in runs) < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_captured_once_across_calls(tiny):
    target, _ = on("cuda", tiny)
    sa = SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4)
    engine = Engine(target, 3, MAX_SEQ, sa=sa, attn="flex", compile=True, prefill_chunk=CHUNK)
    sets = prompt_sets(target.args.vocab_size)
    first = run(engine, sets[0], Sampling(), 0)
    graphs = dict(engine.graphs)
    assert set(k[0][0] for k in graphs) == {"draft", "verify"}
    second = run(engine, sets[1], Sampling(), 0)
    assert engine.graphs == graphs, "a step was captured again"
    eager = Engine(target, 3, MAX_SEQ, sa=sa, prefill_chunk=CHUNK)
    assert [first.tokens, second.tokens] == [run(eager, p, Sampling(), 0).tokens for p in sets[:2]]
    assert engine.capture_s > 0
