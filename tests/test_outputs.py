# What a run writes, under hostile paths and signals: an output never destroys an input or a system
# file, a link or a device stays what it is, an interrupted request stream keeps every result it
# finished (whole lines only) and a rerun with --resume finishes the rest, result lines can be told
# apart and are standard JSON. Real files, real processes, real signals.
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import generate as G

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requests_file(path, n, new=6):
    path.write_text("\n".join(json.dumps(dict(prompt=f"Request number {i}: tell a story.", max_new_tokens=new))
                              for i in range(n)) + "\n")
    return str(path)


def cli(capsys, *argv):
    """generate.cli in this process -> (exit code, stderr)."""
    try:
        code = G.cli(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def ids_in(path):
    return [json.loads(line)["id"] for line in open(path).read().splitlines()]


def test_an_output_that_is_an_input_is_refused(tmp_path, tiny_checkpoint, capsys):
    reqs = requests_file(tmp_path / "req.jsonl", 2)
    before = open(reqs).read()
    code, err = cli(capsys, "--checkpoint_path", tiny_checkpoint, "--requests", reqs, "--results", reqs)
    assert code == 2 and "is the input" in err and "\n" not in err
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello")
    code, err = cli(capsys, "--checkpoint_path", tiny_checkpoint, "--prompt_file", str(prompt), "--json", str(prompt))
    assert code == 2 and "is the input" in err
    link = tmp_path / "link.jsonl"
    link.symlink_to(reqs)  # the same file by another name
    code, err = cli(capsys, "--checkpoint_path", tiny_checkpoint, "--requests", reqs, "--results", str(link))
    assert code == 2 and "is the input" in err
    assert open(reqs).read() == before and prompt.read_text() == "Hello"


def test_links_devices_and_unwritable_places(tmp_path, tiny_checkpoint, capsys):
    reqs = requests_file(tmp_path / "req.jsonl", 2)
    target = tmp_path / "real.jsonl"
    link = tmp_path / "results.jsonl"
    link.symlink_to(target)
    assert cli(capsys, "--checkpoint_path", tiny_checkpoint, "--requests", reqs, "--results", str(link))[0] == 0
    assert link.is_symlink() and sorted(ids_in(target)) == [1, 2]  # the link still points at the results
    mode = os.stat("/dev/null").st_mode
    assert cli(capsys, "--checkpoint_path", tiny_checkpoint, "--requests", reqs, "--results", "/dev/null")[0] == 0
    assert cli(capsys, "--checkpoint_path", tiny_checkpoint, "--prompt", "hi", "--json", "/dev/null")[0] == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_mode == mode
    for flag, path in (("--results", "/proc/self/results.jsonl"), ("--json", "/sys/kernel/out.json"),
                       ("--results", str(tmp_path / "missing" / "r.jsonl"))):
        argv = ["--requests", reqs] if flag == "--results" else ["--prompt", "hi"]
        code, err = cli(capsys, "--checkpoint_path", tiny_checkpoint, *argv, flag, path)
        assert code == 2 and flag in err and "\n" not in err, err


def test_results_to_stdout_are_written_there(tmp_path, tiny_checkpoint):
    reqs = requests_file(tmp_path / "req.jsonl", 3)
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", tiny_checkpoint, "--requests", reqs,
                        "--results", "/dev/stdout"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted(x["id"] for x in lines) == [1, 2, 3] and os.path.islink("/dev/stdout")


@pytest.mark.parametrize("lines,expected", [
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], "line 2: id 'x' is also the id of line 1"),
    (['{"prompt": "a"}', '{"prompt": "b", "id": 1}'], "line 2: id 1 is also the id of line 1"),
    (['{"prompt": "a", "id": NaN}'], "NaN is not standard JSON"),
    (['{"prompt": "a", "id": [1]}'], "'id' must be a string or an integer"),
    (['{"prompt": "a", "id": true}'], "'id' must be a string or an integer"),
    (['{"prompt": "a", "stop": "x"}'], "'stop' must be a list of non-empty strings"),
])
def test_results_can_be_told_apart_and_read_back(tmp_path, tiny_checkpoint, capsys, lines, expected):
    f = tmp_path / "req.jsonl"
    f.write_text("\n".join(lines) + "\n")
    code, err = cli(capsys, "--checkpoint_path", tiny_checkpoint, "--requests", str(f))
    assert code == 2 and expected in err and "\n" not in err, err


def test_a_full_disk_leaves_whole_lines(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """The third result line is written only in part (as on a full disk): the run fails in one line,
    exit 1, and the .partial file holds exactly the two whole lines before it."""
    reqs = requests_file(tmp_path / "req.jsonl", 5)
    out = tmp_path / "res.jsonl"
    real_write, calls = os.write, []

    def half_written(fd, data):
        if data.startswith(b'{"id"'):
            calls.append(data)
            if len(calls) == 3:
                return real_write(fd, data[: len(data) // 2])
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", half_written)
    code, err = cli(capsys, "--checkpoint_path", tiny_checkpoint, "--requests", reqs, "--results", str(out),
                    "--batch_size", "1")
    assert code == 1 and "No space left on device" in err and "\n" not in err, err
    partial = tmp_path / "res.jsonl.partial"
    assert not out.exists() and ids_in(partial) == [json.loads(c)["id"] for c in calls[:2]]


def start_stream(tmp_path, ckpt, *extra):
    reqs = requests_file(tmp_path / "req.jsonl", 30, new=120)
    out = tmp_path / "res.jsonl"
    argv = [sys.executable, "generate.py", "--checkpoint_path", ckpt, "--requests", reqs, "--results", str(out),
            "--batch_size", "2", *extra]
    return argv, out, subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_what_finished_and_resume_finishes_the_rest(tmp_path, tiny_checkpoint, signum, code):
    argv, out, proc = start_stream(tmp_path, tiny_checkpoint)
    partial = tmp_path / "res.jsonl.partial"
    try:
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, err
    assert err.strip().count("\n") == 0 and "stopped by" in err and "--resume" in err and "Traceback" not in err, err
    kept = ids_in(partial)  # every line whole
    assert 2 <= len(kept) < 30 and not out.exists()
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)  # without --resume: refused
    assert again.returncode == 2 and "--resume" in again.stderr and ids_in(partial) == kept
    done = subprocess.run(argv + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming:" in done.stderr and not partial.exists()
    assert sorted(ids_in(out)) == list(range(1, 31)) and ids_in(out)[:len(kept)] == kept
