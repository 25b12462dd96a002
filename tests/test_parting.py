"""scripts/parting.py: the tie test at the dtype's precision, and the check on a real run."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import parting  # noqa: E402


def test_gap_in_ulps():
    # bf16 numbers between 16 and 32 lie 0.125 apart, between 8 and 16 0.0625
    assert parting.gap_in_ulps(25.4211, 25.4839, torch.bfloat16) == pytest.approx(0.0628 / 0.125)
    assert parting.gap_in_ulps(9.2179, 9.1849, torch.bfloat16) == pytest.approx(0.033 / 0.0625)
    assert parting.gap_in_ulps(-20.0, -21.0, torch.bfloat16) == pytest.approx(8.0)
    assert parting.gap_in_ulps(25.0, 25.0625, torch.float32) > 1e4


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parting.main(argv)
    return e.value.code, capsys.readouterr().out


def test_fp32_rows_never_part_and_a_wrong_token_is_caught(smollm2_dir, essays_path, capsys, monkeypatch):
    argv = ["--checkpoint_path", smollm2_dir, "--essays", essays_path, "--rows", "2", "--prefix", "300",
            "--new_tokens", "10", "--gammas", "3", "--dtype", "float32", "--no-compile"]
    code, out = run(argv, capsys)
    assert code == 0 and "2 of 2 rows equal to AR" in out and "0 partings" in out

    real = parting.generate_rows

    def corrupted(model, prompts, args, sa=None):  # speculative rows with one token swapped for an unlikely one
        rows = real(model, prompts, args, sa)
        if sa is not None:
            rows[1][4] = 0 if rows[1][4] != 0 else 1
        return rows

    monkeypatch.setattr(parting, "generate_rows", corrupted)
    code, out = run(argv, capsys)
    assert code == 1 and "row 1 parts at token 4" in out and "NOT A TIE" in out and "1 partings, 1 wider" in out
