# The benchmark scripts end to end on SmolLM2 with the smallest arguments: each writes its JSON with
# the fields its readers (benchmarks/plot.py, the README's tables) use, and the values are sane. Speeds
# are not asserted: this machine's timings say nothing here. In fp32, greedy speculative rows equal
# autoregressive ones, and this engine's rows equal transformers' (tests/test_parity.py).
import json
import os
import sys

import pytest
import torch

from benchmarks import acceptance, cold_start as bench_cold_start, peer as bench_peer, plot, serving, sweep as bench_sweep

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import convert_hf_checkpoint  # noqa: E402


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sweep_json(smollm2_dir, essays_path, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sweep") / "sweep.json")
    # batch 1 over a pool of 2 prompts: two generate() calls per run, merged
    bench_sweep.main(["--checkpoint_path", smollm2_dir, "--essays", essays_path, "--device", "cpu", "--dtype", "float32",
                      "--batch_sizes", "1", "--prompt_pool", "2", "--prefixes", "48", "--budgets", "24",
                      "--gammas", "1,2,auto", "--draft_kv", "streaming", "--max_new_tokens", "6", "--repeats", "1",
                      "--step_repeats", "1", "--json", path])
    return path


def test_sweep(sweep_json):
    data = read(sweep_json)
    assert data["settings"]["max_new_tokens"] == 6 and data["env"]["torch"]
    [ar] = data["ar"]
    assert (ar["batch_size"], ar["prefix"], ar["prompts"]) == (1, 48, 2) and ar["tokens_per_s_median_step"] > 0
    assert sorted(r["gamma"] for r in data["sd"]) == [1, 2]
    for r in data["sd"]:
        assert (r["speculate"], r["draft_kv"], r["budget"], r["prompts"]) == ("self", "streaming", 24, 2)
        assert r["speedup"] > 0 and r["speedup_wall"] > 0 and r["rows_equal"] == 1.0
        assert 0 <= r["acceptance"] <= 1 and 1 <= r["tokens_per_round"] <= r["gamma"] + 1
        assert r["t_draft_over_t_target"] > 0 and r["t_verify_over_t_target"] > 0
        assert r["predicted_speedup"] > 0 and r["predicted_speedup_batch"] > 0 and r["model_speedup"] > 0
    [auto] = data["gamma_auto"]
    assert auto["gamma"] == "auto" and auto["rows_equal"] == 1.0 and auto["best_fixed_gamma"] in (1, 2)
    assert set(auto["start_gamma"]) <= {1, 2} and all(set(used) <= {"1", "2"} for used in auto["gammas_used"])
    assert auto["auto_over_best_fixed"] > 0 and auto["auto_over_best_fixed_by_rounds"] > 0
    [choice] = data["gamma_choices"]
    assert choice["model_gamma"] in (1, 2) and choice["measured_best_gamma"] in (1, 2)
    [steps] = data["steps"]
    assert set(steps["self"]["t_verify"]) == {"1", "2"} and set(steps["self"]["t_draft"]) == {"24"}


def test_plot_of_a_sweep(sweep_json, tmp_path):
    pytest.importorskip("matplotlib")
    paths = plot.main([sweep_json, "--out", str(tmp_path)])
    assert [os.path.basename(p) for p in paths] == ["speedup_vs_batch.png", "acceptance_vs_budget.png",
                                                     "predicted_vs_measured.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)


@pytest.fixture(scope="module")
def hf_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2 as a transformers model directory, written from our model.pth by the inverse of
    scripts/convert_hf_checkpoint.py: transformers loads it in a second, the GGUF in about 15."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    ours = torch.load(os.path.join(smollm2_dir, "model.pth"), mmap=True, weights_only=True)
    n_q, n_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def halves(w, n_head):  # our interleaved RoPE pairs -> transformers' [evens | odds] per head
        return w.reshape(n_head, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)

    state = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = ours[f"layers.{i}.attention.wqkv.weight"].split([n_q, n_kv, n_kv])
        state.update({p + "self_attn.q_proj.weight": halves(q, cfg.num_attention_heads),
                      p + "self_attn.k_proj.weight": halves(k, cfg.num_key_value_heads), p + "self_attn.v_proj.weight": v})
        state.update({p + hf: ours[f"layers.{i}.{name}"] for hf, name in convert_hf_checkpoint.RENAMES.items()})
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the output matrix is the embedding (tied)
    out = str(tmp_path_factory.mktemp("hf"))
    model.save_pretrained(out)
    return out


def test_peer(smollm2_dir, hf_dir, essays_path, tmp_path):
    path = str(tmp_path / "peer.json")
    bench_peer.main(["--checkpoint_path", smollm2_dir, "--hf_model", hf_dir, "--hf_gguf", "", "--essays", essays_path,
                     "--device", "cpu", "--dtype", "float32",
                     "--prefixes", "48", "--ar_batch_sizes", "2", "--gammas", "2", "--budgets", "24", "--early_exit", "",
                     "--max_new_tokens", "5", "--repeats", "1", "--json", path])
    data = read(path)
    assert data["env"]["transformers"]
    methods = {(r["batch_size"], r["system"], r["method"]) for r in data["results"]}
    assert methods == {(1, "engine", "ar"), (1, "transformers", "ar"), (1, "engine", "self-spec streaming b24 g2"),
                       (1, "transformers", "prompt lookup g2"), (2, "engine", "ar"), (2, "transformers", "ar")}
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["speedup_over_own_ar"] > 0 and r["over_transformers_ar"] > 0
        assert r["rows_equal"] == 1.0, r  # every row equals this engine's AR row
        if r["method"] == "ar":
            assert r["tokens_per_s_median_step"] > 0
    spec = next(r for r in data["results"] if r["method"].startswith("self-spec"))
    assert 0 <= spec["acceptance"] <= 1
    one, two = data["summary"]
    assert (one["batch_size"], two["batch_size"]) == (1, 2) and two["engine_ar_over_transformers_ar"] > 0
    assert one["best_engine_spec_over_best_transformers_assisted"] > 0


def test_cold_start(smollm2_dir, tmp_path):
    path = str(tmp_path / "cold.json")
    bench_cold_start.main(["--checkpoint_path", smollm2_dir, "--max_new_tokens", "4", "--repeats", "1", "--json", path])
    data = read(path)
    for c in ("eager", "compiled_cold", "compiled_warm"):
        [run] = data["runs"][c]
        assert run["wall_s"] > 0 and run["tokens_per_s"] > 0 and run["new_tokens"] == 4 and run["prefill_s"] > 0
        assert data["median"][c]["wall_s"] == run["wall_s"]
    assert data["compiled_cold_over_eager"] > 0 and data["compiled_warm_over_eager"] > 0
    assert len(data["compiled_cold_over_eager_runs"]) == 1 and data["settings"]["gamma"] == 3


def test_acceptance_and_its_plot(smollm2_dir, essays_path, tmp_path):
    path = str(tmp_path / "acceptance.json")
    acceptance.main(["--checkpoint_path", smollm2_dir, "--essays", essays_path, "--rows", "2", "--prompt_len", "64",
                     "--new_tokens", "6", "--gamma", "2", "--budgets", "24", "--kinds", "streaming", "snapkv",
                     "--refresh", "1", "0", "--json", path])
    data = read(path)
    assert (data["rows"], data["prompt_len"], data["gamma"]) == (2, 64, 2)
    assert {(r["draft_kv"], r["refresh"]) for r in data["results"]} == {(k, f) for k in ("streaming", "snapkv")
                                                                        for f in (True, False)}
    for r in data["results"]:
        assert 0 <= r["acceptance"] <= 1 and 1 <= r["tokens_per_round"] <= 3 and r["equals_autoregressive"]
    pytest.importorskip("matplotlib")
    [png] = plot.main([path, "--out", str(tmp_path)])
    assert os.path.basename(png) == "acceptance_vs_budget.png" and os.path.getsize(png) > 0


def test_serving(tiny_checkpoint, tmp_path):
    """--quick through real servers (AR and self-speculation, 2 slots) on the tiny checkpoint: every
    request answered, the figures of each rate present and sane, and the plot written."""
    path = serving.main(["--quick", "--checkpoint_path", tiny_checkpoint, "--dtype", "float32",
                         "--json", str(tmp_path / "serving.json"), "--plots", str(tmp_path)])
    data = read(path)
    assert {(r["mode"], r["slots"], r["rate"]) for r in data["runs"]} == {(m, 2, r) for m in ("ar", "sd")
                                                                           for r in (4.0, "inf")}
    for r in data["runs"]:
        assert r["completed"] == r["requests"] == 4 and not r["errors"] and r["cycle"] == 0
        assert r["tokens"] == sum(q["tokens"] for q in r["per_request"]) > 0 and r["tokens_per_s"] > 0
        assert all(q["tokens"] <= q["max_tokens"] for q in r["per_request"])
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert 0 < r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"], (key, r[key])
        assert (r["acceptance"] is None) == (r["mode"] == "ar") and (r["mode"] == "ar" or 0 <= r["acceptance"] <= 1)
    assert all(row["sd_over_ar_tokens_per_s"] > 0 for row in data["summary"])
    assert os.path.getsize(tmp_path / "serving_throughput_vs_tpot.png") > 0


def test_attention_backends(smollm2_dir, tmp_path):
    """steps and e2e with two backends on tiny shapes: every step and mode timed per backend, ratios
    over the first backend present; in fp32 both backends' greedy SD rows have the same acceptance."""
    from benchmarks import attention
    steps = str(tmp_path / "steps.json")
    attention.main(["steps", "--shapes", "float32:2:64", "--backends", "sdpa,math", "--cycles", "1", "--repeats", "1",
                    "--budget", "24", "--no-compile", "--json", steps])
    [row] = read(steps)["steps"]
    assert set(row["ms"]) == {f"{b} {w}" for b in ("sdpa", "math") for w in ("decode", "verify", "draft")}
    assert all(v > 0 for v in row["ms"].values()) and set(row["ratios"]) == {f"math/sdpa {w}" for w in
                                                                              ("decode", "verify", "draft")}
    e2e = str(tmp_path / "e2e.json")
    attention.main(["e2e", "--checkpoint_path", smollm2_dir, "--shapes", "float32:2:64", "--backends", "sdpa,math",
                    "--cycles", "1", "--new_tokens", "6", "--budget", "24", "--gamma", "2", "--no-compile",
                    "--json", e2e])
    [row] = read(e2e)["e2e"]
    assert {(r["attn"], r["mode"]) for r in row["runs"]} == {(b, m) for b in ("sdpa", "math") for m in ("ar", "sd")}
    sd = [r["acceptance"] for r in row["runs"] if r["mode"] == "sd"]
    assert len(sd) == 2 and abs(sd[0] - sd[1]) < 0.1
    assert set(row["ratios"]) == {"sdpa sd/ar", "math sd/ar", "math/sdpa ar", "math/sdpa sd"}


def test_quant_profile(smollm2_dir, tmp_path):
    from benchmarks import quant
    path = str(tmp_path / "profile.json")
    quant.main(["profile", "--checkpoint_path", smollm2_dir, "--schemes", "bf16,int8", "--shapes", "1x32",
                "--steps", "2", "--no-compile", "--json", path])
    rows = read(path)["profile"]
    assert [r["scheme"] for r in rows] == ["bf16", "int8"] and all(r["step_ms"] > 0 and r["top_ops"] for r in rows)
    assert any("int8pack" in op["op"] for op in rows[1]["top_ops"])  # the int8 step runs the int8 kernel
