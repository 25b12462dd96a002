# The prepared GPU check's CPU smoke mode: the same script and phases on tiny shapes, so that the
# command a GPU run depends on cannot rot between the rare runs on a GPU; and a shape that fails is
# recorded while the check goes on.
import json
import os
import subprocess

from benchmarks import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_writes_every_field(tmp_path, smollm2_dir):
    out = tmp_path / "gpu.json"
    # every phase must run: the time budget (whose skipping is the GPU run's guard) is lifted, so a
    # loaded machine makes the smoke run slower, not shorter
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--budget_s", "3600", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads(out.read_text())
    for key in ("device", "torch", "commit", "copy_bandwidth_GBps", "compile_s", "capture_s", "recompiles",
                "predicted_speedup_8b", "attn_default"):
        assert key in rec, key
    assert rec["failures"] == [] and all(p["ok"] for p in rec["preflight"]), rec["failures"]
    steps = {"prefill chunk", "decode", "self-speculation draft setup", "draft", "verify", "scored verify", "refill",
             "request stream (refills, rounds)", "speculative generation"}
    assert {(p["attn"], p["step"]) for p in rec["preflight"]} == {(a, s) for a in ("sdpa", "flex") for s in steps}
    assert {(a["batch_size"], a["context"], a["attn"]) for a in rec["ar"]} == {(1, 256, "sdpa"), (1, 256, "flex"),
                                                                                (4, 512, "sdpa"), (4, 512, "flex")}
    for row in rec["ar"]:
        assert row["step_ms"] > 0 and row["bandwidth_fraction"] > 0
    assert {(r["batch_size"], r["quantization"][0]) for r in rec["ar"]} == {(1, "none"), (1, "int8"), (1, "int4"),
                                                                           (4, "none")}
    ratios = rec["step_ratios"][0]
    assert set(ratios["t_verify_over_t_target"]) == {"2", "4"} and ratios["t_draft_over_t_target"] > 0
    assert rec["predicted_speedup_8b"]["speedup"] > 0
    sd, reselecting = rec["sd"]
    assert (sd["draft_reselect"], reselecting["draft_reselect"]) == (0, gpu_check.RESELECT_EVERY)
    assert reselecting["rows_equal"] == 1.0
    assert ratios["t_scored_verify_over_t_verify"] > 0 and ratios["t_draft_int4_over_t_target"] > 0
    for key in ("model", "batch_size", "prefix", "new_tokens", "gamma", "draft_budget", "acceptance",
                "ar_tokens_per_s", "sd_tokens_per_s", "speedup", "t_draft_over_t_target", "t_verify_over_t_target"):
        assert key in sd, key
    assert sd["rows_equal"] == 1.0  # fp32 greedy: speculation gives the AR tokens
    assert rec["recompiles"] == 0 and not rec["skipped"]
    assert set(rec["stream"]["ratios"]) >= {"sd_continuous_over_sd_static", "sd_continuous_over_ar_continuous"}
    assert {(r["mode"], r["slots"], r["rate"]) for r in rec["serving"]["runs"]} == {(m, 2, r) for m in ("ar", "sd")
                                                                                   for r in (4.0, "inf")}
    assert all(r["completed"] == r["requests"] for r in rec["serving"]["runs"]) and rec["serving"]["summary"]
    # a second run of one phase keeps the others' results
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--phases", "ratios", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["ar"] == rec["ar"] and again["sd"] == rec["sd"] and len(again["runs"]) == 2


def test_a_failing_shape_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
    real = gpu_check.ar_shape

    def fails_at_batch_1(run, hw, model, name, B, S, attn):
        if B == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(run, hw, model, name, B, S, attn)
    monkeypatch.setattr(gpu_check, "ar_shape", fails_at_batch_1)
    out = tmp_path / "gpu.json"
    gpu_check.main(["--smoke", "--phases", "ar", "--backends", "sdpa", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert [(r["batch_size"], r["context"]) for r in rec["ar"]] == [(4, 512)]  # the next shape still ran
    failure = rec["failures"][0]  # then its int8 and int4 rows, which fail alike
    assert [f["what"] for f in rec["failures"]] == ["ar tiny B=1 S=256 sdpa", "ar tiny B=1 S=256 sdpa int8",
                                                    "ar tiny B=1 S=256 sdpa int4"]
    assert "illegal memory access" in failure["error"]
    assert "fails_at_batch_1" in failure["traceback"]
