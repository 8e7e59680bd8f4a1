"""Sweeps that finish and fail in one line: a failing point does not stop the others, a
corrupt record is moved aside and recomputed, a full or read-only filesystem is one line,
and values that are not numbers (or absurd sizes, or paths out of configs/) are refused
while planning."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmark.run import main
from tests.test_datasets import write_cifar10

FAILING_SWEEP = ["data=two_moons", "model=mlp", "train=toy", "train.lr=1e-3,1e6", "nfe=1",
                 "train.steps=30", "train.progress=false", "eval.num_samples=200", "tracking.enabled=false"]


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def no_torn_files(results: Path) -> None:
    """No temp file left behind and every JSON file whole."""
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]
    for path in results.rglob("*.json"):
        json.loads(path.read_text())


# ----------------------------------------------------------------------------------------
# Validation while planning


@pytest.mark.parametrize(("override", "says"), [
    ("train.lr=nan", "train.lr=nan is not a finite number"),
    ("guidance=inf", "guidance=inf is not a finite number"),
    ("guidance=nan", "guidance=nan is not a finite number"),
    ("eval.ema=nan", "eval.ema=nan is not a relative EMA width"),
    ("train.ema_profiles=[0.05,nan]", "train.ema_profiles=nan is not a relative EMA width"),
    ("train.betas=[0.9,nan]", "train.betas=nan is not a finite number"),
    ("nfe=100000000", "nfe=100000000 is out of range; expected a value >= 1 and <= 10000"),
    ("eval.num_samples=1000000000", "eval.num_samples=1000000000 is out of range"),
    ("eval.seed=99999999999999999999", "eval.seed=99999999999999999999 is out of range"),
    ("results_dir=", "results_dir= is empty"),
    ("model=../../x", "unknown model '../../x'; expected one of: dit-b, dit-l, dit-s, dit-small-cpu, dit-tiny"),
    ("method=fm,../methods/fm", "unknown method '../methods/fm'"),
    ("hydra/job_logging=../../x", "unknown key 'hydra/job_logging'"),
])
def test_values_that_are_not_numbers_absurd_sizes_and_paths_out_of_configs_are_refused_while_planning(
        override: str, says: str, tmp_path: Path, capsys) -> None:
    folder = [] if override.startswith("results_dir=") else [f"results_dir={tmp_path / 'r'}"]
    assert main(["--dry-run", override, *folder]) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {says}")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------
# Failing points


def test_inline_sweep_records_the_good_point_names_the_failed_one_and_a_rerun_retries_only_it(
        tmp_path: Path, capsys) -> None:
    args = [*FAILING_SWEEP, f"results_dir={tmp_path / 'results'}"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("runs/*/evals/*.json")]
    assert len(records) == 1 and "| fm " in out
    good = records[0]["train_key"]
    config = json.loads((tmp_path / "results" / "runs" / good / "config.json").read_text())
    assert config["identity"]["train"]["lr"] == 1e-3
    failed = [ln for ln in lines(err) if ln.startswith("failed: ")]
    assert len(failed) == 1 and "(train.lr=1000000.0)" in failed[0] and "TrainingDiverged" in failed[0]
    bad = failed[0].split()[2]  # "failed: training <key> ..."
    assert bad != good and len(bad) == 12
    assert lines(err)[-1].startswith("error: 1 training(s) and 0 evaluation(s) failed")
    assert "Traceback" not in err
    assert main(args) == 1  # the rerun: the good point is reused, only the failed one is tried again
    out, _ = capsys.readouterr()
    assert [ln.split()[-1] for ln in lines(out) if ln.strip().startswith("running ")] == [bad]


def test_a_garbage_record_is_reported_moved_aside_and_recomputed_and_collect_survives_it(
        toy_overrides: list[str], capsys) -> None:
    args = [*toy_overrides, "nfe=1,2", "tracking.enabled=false"]
    results = Path(next(a.split("=", 1)[1] for a in toy_overrides if a.startswith("results_dir=")))
    assert main(args) == 0
    truncated, garbage = sorted(results.glob("runs/*/evals/*.json"))
    truncated.write_text(truncated.read_text()[:40])
    garbage.write_bytes(b"\x00\xff not json")
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    warned = [ln for ln in lines(err) if ln.startswith("warning: ")]
    assert len(warned) == 2 and {f"warning: {truncated} is unreadable", f"warning: {garbage} is unreadable"} == {
        ln.split(" (", 1)[0] for ln in warned}
    assert all("moved it aside to" in ln and "it will be recomputed" in ln for ln in warned)
    assert len(list(results.glob("runs/*/evals/*.json.corrupt-*"))) == 2
    assert out.count("evaluated ") == 2  # both recomputed
    assert json.loads(truncated.read_text())["nfe"] in (1, 2) and json.loads(garbage.read_text())
    garbage.write_text("[]")  # valid JSON, not a record
    assert main([*args, "--collect"]) == 0
    out, err = capsys.readouterr()
    assert "collected 1 of 2 evaluation(s); 1 missing" in out and f"warning: {garbage} is unreadable" in err


# ----------------------------------------------------------------------------------------
# Operating-system failures


def mount_tmpfs(where: Path, size: str) -> Path:
    """A real tmpfs of ``size`` mounted at ``where`` (root only; skips, saying why, elsewhere)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")
    return where


@pytest.fixture
def mounts(tmp_path: Path):
    """``mounts(size)``: a fresh tmpfs of that size; all are unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mounted.append(mount_tmpfs(tmp_path / f"fs{len(mounted)}", size))
        return mounted[-1]

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_line_naming_the_path_exit_1_nothing_torn(mounts, toy_overrides, capsys) -> None:
    results = mounts("200k") / "results"
    args = [a for a in toy_overrides if not a.startswith("results_dir=")]
    # the MLP's checkpoint (weights, EMA, optimizer state: 2.5 MB) does not fit in 200 KiB
    assert main([*args, f"results_dir={results}"]) == 1
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {results}/runs/") and err[0].split(": ")[1].endswith(".pt")
    assert "No space left on device (ENOSPC); free some space there" in err[0]
    assert not list(results.glob("runs/*/*.pt"))
    no_torn_files(results)


def test_a_read_only_folder_is_one_line_naming_the_path_exit_1_nothing_torn(mounts, toy_overrides, capsys) -> None:
    fs = mounts("64m")
    results = fs / "results"
    args = [*[a for a in toy_overrides if not a.startswith("results_dir=")], "tracking.enabled=false",
            f"results_dir={results}"]
    assert main([*args, "nfe=1"]) == 0  # a finished run, then the filesystem goes read-only
    before = sorted(p.name for p in results.rglob("*"))
    remount = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only ({remount.stderr.strip()})")
    capsys.readouterr()
    assert main([*args, "nfe=2"]) == 1  # a new point: its evaluation cannot be written
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {results}/runs/")
    assert "Read-only file system (EROFS); that filesystem is mounted read-only" in err[0]
    assert sorted(p.name for p in results.rglob("*")) == before
    no_torn_files(results)


def test_a_file_where_the_results_folder_should_be_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "results").write_text("not a folder")
    assert main([*FAILING_SWEEP[:3], "nfe=1", f"results_dir={tmp_path / 'results' / 'sub'}"]) == 1
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "Not a directory (ENOTDIR); a file stands where a folder is expected" in err[0]
    assert str(tmp_path / "results") in err[0]


# ----------------------------------------------------------------------------------------
# Inception weights, before anything trains


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 folder of a few images, in torchvision's format."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=4)
    return root


@pytest.mark.parametrize(("content", "says"), [
    ("garbage", "unreadable as a plain state_dict"),
    ("foreign", "failed (RuntimeError: Error(s) in loading state_dict"),
])
def test_a_bad_inception_weights_file_is_refused_before_anything_trains(
        content: str, says: str, cifar_root: Path, tmp_path: Path, capsys) -> None:
    import torch

    folder = tmp_path / "inception"
    folder.mkdir()
    weights = folder / "weights-inception-2015-12-05-6726825d.pth"
    if content == "garbage":
        weights.write_bytes(b"a truncated download" * 100)
    else:  # a state_dict with the right last layer and nothing else: not the network
        torch.save({"Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1)}, weights)
    assert main(["data=cifar10", f"data.root={cifar_root}", f"eval.inception_weights={folder}",
                 "tracking.enabled=false", f"results_dir={tmp_path / 'results'}"]) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and str(weights) in err[0] and says in err[0]
    assert not (tmp_path / "results" / "runs").exists()  # nothing trained, nothing written
