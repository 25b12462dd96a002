# Compiled steps (generate.compile_steps: fullgraph, static shapes) on tiny random models, CPU:
# greedy output equals eager, nothing breaks the graphs, and after one warm-up generation per setup,
# generations with other prompts, lengths and acceptance compile nothing more.
#
# Inductor builds the autoregressive and the self-speculation (StreamingLLM, refreshed draft) steps.
# The other setups use the aot_eager backend, which traces the same graphs (recompiles and graph
# breaks are decided before the backend) without inductor's minutes of C++ builds.
#
# Where CUDA is available every setup also runs there with inductor, the decode, draft and verify
# steps replaying as CUDA graphs (mode="reduce-overhead"), and speculation must equal AR there too.
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import generate as G
from generate import SpecArgs, generate
from model import place
from spec import Sampling
from test_spec import VOCAB, tiny

MAX_NEW, MAX_SEQ, CHUNK = 24, 96, 32
# (backend, speculation, attention, graphs): every graph costs a compile (tens of seconds for a
# 30-layer model), so the count is pinned: prefill chunk and decode step; prefill, draft step and
# verify step; a standalone draft adds its own prefill and a 2-token catch-up draft step.
SETUPS = {
    "autoregressive": ("inductor", None, "sdpa", 2),
    "self-streaming": ("inductor", SpecArgs("self", 3, "streaming", 24, sinks=4), "sdpa", 3),
    "self-snapkv": ("aot_eager", SpecArgs("self", 3, "snapkv", 24, snapkv_window=8), "sdpa", 3),
    "draft-streaming": ("aot_eager", SpecArgs("draft", 3, "streaming", 24, sinks=4, refresh=False), "sdpa", 5),
    "draft-snapkv": ("aot_eager", SpecArgs("draft", 2, "snapkv", 24, snapkv_window=8, refresh=False), "sdpa", 5),
    "self-streaming-flex": ("aot_eager", SpecArgs("self", 3, "streaming", 24, sinks=4), "flex", 3),
    "draft-snapkv-flex": ("aot_eager", SpecArgs("draft", 2, "snapkv", 24, snapkv_window=8, refresh=False), "flex", 5),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def models():
    return tiny(0, n_layer=2), tiny(1, n_layer=1, dim=32)


def on(device, models):
    return tuple(place(copy.deepcopy(m), device, torch.float32) if device != "cpu" else m for m in models)


def prompt_sets():
    """Three batches of three rows: other lengths, order and content each time (same batch size and
    cache length, which fix the compiled shapes)."""
    g = torch.Generator().manual_seed(5)
    return [[torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]
            for lens in ((7, 61, 26), (40, 5, 66), (33, 12, 50))]


@pytest.fixture(scope="module", autouse=True)
def eager_after():
    # several setups compile the same step functions; each is one more cache entry of that code
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    for device in DEVICES:
        G.compile_steps(device, enable=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", SETUPS)
def test_compiled_generation_matches_eager_without_recompiling(models, setup, device):
    backend, sa, attn, n_graphs = SETUPS[setup]
    backend = "inductor" if device == "cuda" else backend
    target, draft = on(device, models)
    draft = draft if sa is not None and sa.mode == "draft" else None

    def run(prompts, attn=attn, sa=sa):
        return generate(target, prompts, MAX_NEW, {0}, Sampling(), MAX_SEQ, CHUNK, sa=sa, draft_model=draft, attn=attn)

    G.compile_steps(device, enable=False)
    want = [run(p, "sdpa").tokens for p in prompt_sets()]  # flex must give the same tokens
    if device == "cuda" and sa is not None:  # on CPU, test_spec covers this exhaustively
        assert want == [run(p, "sdpa", None).tokens for p in prompt_sets()], "speculation differs from AR"
    G.compile_steps(device, backend=backend)
    torch._dynamo.reset()  # count this setup's graphs from scratch
    counters.clear()
    runs = [run(prompt_sets()[0])]  # warm-up: compiles every step this setup uses
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == n_graphs, f"{graphs} compiled graphs, expected {n_graphs}"
    with torch.compiler.set_stance("fail_on_recompile"):
        runs += [run(p) for p in prompt_sets()[1:]]
    assert counters["stats"]["unique_graphs"] == graphs, "a step compiled again after warm-up"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["inductor"]["cudagraph_skips"], "a step did not run as a CUDA graph (TORCH_LOGS=cudagraphs)"
    assert [r.tokens for r in runs] == want
    if sa is not None:  # acceptance varies across runs, and rejections (rollbacks) happen
        assert len({r.acceptance for r in runs}) > 1 and max(r.acceptance for r in runs) < 1
