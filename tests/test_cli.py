"""The command line: the plan, help, and one clear line with exit code 2 for every mistake."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("method=nosuch", ["nosuch", "fm", "meanflow"]),
        ("nfe=0", ["nfe=0", ">= 1"]),
        ("nfe=a", ["nfe='a'", "integer"]),
        ("model=dit-huge", ["dit-huge", "dit-tiny"]),
        ("train.steps=-1", ["train.steps=-1", ">= 1"]),
        ("train.nosuchkey=1", ["train.nosuchkey"]),
        ("nfe=1,,2", ["nfe=1,,2"]),
        ("nfe=range(1,1)", ["empty sweep"]),
        ("guidance=abc", ["guidance='abc'"]),
        ("train.schedule=linear", ["linear", "cosine"]),
        ("--nosuchflag", ["--nosuchflag"]),
    ],
)
def test_user_mistake_is_one_line_exit_2_without_traceback(override: str, names: list[str]) -> None:
    result = run_cli(override, "--dry-run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for name in names:
        assert name in lines[0]


def test_dry_run_shows_one_training_and_two_evaluations() -> None:
    result = run_cli("method=fm", "nfe=1,2", "--dry-run", "results_dir=/nonexistent-dry-run")
    assert result.returncode == 0, result.stderr
    assert "plan: 1 training(s), 2 evaluation(s)" in result.stdout
    assert result.stdout.count("\ntraining ") == 1
    assert result.stdout.count("  eval ") == 2
    assert "[missing]" in result.stdout
    assert "nfe=1 (passes 1)" in result.stdout and "nfe=2 (passes 2)" in result.stdout


def test_guided_fm_evaluation_counts_two_passes_per_step_in_the_plan() -> None:
    result = run_cli("method=fm", "nfe=4", "guidance=1,2", "--dry-run", "results_dir=/nonexistent-dry-run")
    assert result.returncode == 0, result.stderr
    assert "plan: 1 training(s), 2 evaluation(s)" in result.stdout
    assert "nfe=4 (passes 4) guidance=1" in result.stdout
    assert "nfe=4 (passes 8) guidance=2" in result.stdout


def test_help_lists_every_group_and_its_choices() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for group, choice in [("method", "fm"), ("model", "dit-tiny"), ("data", "digits"),
                          ("train", "default"), ("eval", "default"), ("launcher", "inline")]:
        line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith(group + " "))
        assert choice in line


def test_model_size_sweep_trains_once_per_size() -> None:
    result = run_cli("model=dit-tiny,dit-s", "nfe=1,2", "--dry-run", "results_dir=/nonexistent-dry-run")
    assert result.returncode == 0, result.stderr
    assert "plan: 2 training(s), 4 evaluation(s)" in result.stdout


def test_toy_data_with_an_image_backbone_is_a_clear_error() -> None:
    result = run_cli("data=eight_gaussians", "--dry-run")
    assert result.returncode == 2
    assert "model=mlp train=toy" in result.stderr


def test_free_form_mappings_take_new_keys_without_a_plus() -> None:
    """sbatch options and dataset options are the user's own keys: Hydra's struct mode would
    refuse ``launcher.additional={account: x}``; the composer opens those two mappings."""
    from benchmark.config import compose_points

    point = compose_points(["launcher=slurm", "launcher.additional={account:lab,qos:high}",
                            "launcher.additional.comment=sweep"])[0]
    assert point.config.launcher.additional == {"account": "lab", "qos": "high", "comment": "sweep"}
    plus = compose_points(["launcher=slurm", "+launcher.additional.account=lab"])[0]
    assert plus.config.launcher.additional == {"account": "lab"}
    toy = compose_points(["data=gaussian1d", "data.options.mean=3"])[0]
    assert toy.config.data.options == {"mean": 3, "std": 0.4}
    unknown = run_cli("launcher.nosuch.x=1", "--dry-run")  # other groups stay strict
    assert unknown.returncode == 2 and "launcher.nosuch" in unknown.stderr


def test_a_class_accuracy_at_chance_is_warned_about_and_a_learned_one_is_not() -> None:
    from benchmark.run import chance_warnings

    def record(acc: float, lo: float, hi: float) -> dict:
        return {"method": "fm", "nfe": 1, "ema": 0.1, "data": "digits", "train_steps": 300,
                "metrics": {"class_acc": acc}, "intervals": {"class_acc": [lo, hi]}}

    [line] = chance_warnings([record(0.11, 0.09, 0.13), record(0.98, 0.97, 0.99)])
    assert line.startswith("warning: fm nfe=1") and "at chance (1/10)" in line and "train.steps=300" in line
    assert chance_warnings([{**record(0.11, 0.09, 0.13), "data": "gaussian1d"}]) == []
