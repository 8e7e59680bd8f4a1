"""The step-cost benchmark measures a real training step of every registered method
(timings are reported by the script, never asserted; FLOPs are counted and exact)."""

from __future__ import annotations

import pytest

from benchmark.stepcost import default_rows, main, measure, split_row, target
from methods.specs import METHOD_NAMES, get_spec, step_cost_baseline


def test_rows_come_from_the_method_registry() -> None:
    rows = default_rows()
    assert rows[:len(METHOD_NAMES)] == list(METHOD_NAMES)
    variants = [f"{name}+{o.partition('=')[2]}" for name in METHOD_NAMES for o in get_spec(name).step_cost_variants]
    assert rows[len(METHOD_NAMES):] == variants and "imf+in_context" in variants
    assert split_row("imf+in_context") == ("imf", ["model.conditioning_mode=in_context"])
    assert split_row("scm+model.conditioning_mode=in_context") == ("scm", ["model.conditioning_mode=in_context"])
    assert target(step_cost_baseline()) == 1.0 and target("imf+in_context") is None
    assert all(target(m) is not None for m in METHOD_NAMES)  # every method declares its target


def test_an_undeclared_variant_is_one_line_naming_the_declared_ones(capsys) -> None:
    assert main(["--methods", "imf+nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nosuch'" in err[0] and "imf+in_context" in err[0]


@pytest.mark.parametrize("row", default_rows())
def test_step_cost_worker_times_and_counts_a_training_step_of_every_row(row: str) -> None:
    out = measure(row, "dit-tiny", batch=8, steps=2, device="cpu", threads=1)
    assert len(out["times"]) == 2 and all(t > 0 for t in out["times"])
    assert out["params"] > 0 and out["flops"] > 0


def test_an_unknown_row_is_one_line_and_exit_2(capsys) -> None:
    assert main(["--methods", "fm,nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "expected one of" in err[0]


def test_help_names_the_rows_and_exits_0(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--methods" in capsys.readouterr().out


def test_gpu_check_says_in_one_line_that_it_needs_cuda() -> None:
    import subprocess
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run (scripts/gpu_check.sh)")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no CUDA device" in lines[0]
    compile((repo / "scripts" / "gpu_check.py").read_text(), "gpu_check.py", "exec")  # the GPU side parses
