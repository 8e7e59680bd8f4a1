"""Paper presets (configs/experiment/): each composes through the compose API, carries its
published number, plans in a dry run although its files are absent (keys marked
provisional, the missing files listed), and fails a real run in one line; command-line keys
win over a preset's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmark.config import CONFIG_DIR, compose_points, group_choices
from benchmark.run import main

PRESETS = group_choices("experiment")


def test_every_published_setting_has_a_preset() -> None:
    assert set(PRESETS) >= {"meanflow-b2-imagenet256", "meanflow-xl2-imagenet256", "imf-b2-imagenet256",
                            "shortcut-dit-b-imagenet256", "scm-cifar10", "fm-sit-xl2-imagenet256",
                            "fm-cifar10"}


# Every preset's dry run counts its training FLOPs on small stand-ins (5-30 s at DiT-B/XL
# width on 2 cores): one preset in the default suite, all of them in the slow stage.
QUICK_PRESET = "fm-cifar10"


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == QUICK_PRESET else pytest.mark.slow)
                                  for n in PRESETS])
def test_preset_dry_run_prints_the_plan_its_budget_and_what_is_missing(name: str, tmp_path: Path,
                                                                       capsys) -> None:
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Published" in text and "_target_" not in text
    code = main([f"experiment={name}", f"results_dir={tmp_path}", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "plan: 1 training(s)" in out
    steps, batch = re.search(r"budget: ([\d,]+) steps x batch ([\d,]+) = ([\d,]+)", out).groups()[:2]
    assert int(steps.replace(",", "")) >= 100000 and int(batch.replace(",", "")) >= 256
    assert "[files not available: provisional key]" in out
    flops, hours = re.search(r"training ≈ ([\d.e+]+) FLOPs .*≈ ([\d,.]+) GPU-hours", out).groups()
    assert float(flops) > 1e18 and float(hours.replace(",", "")) > 1  # a GPU-scale run, counted
    assert re.search(r"not available \(a real run stops at the first of these.*\n  - data=", out)


def test_preset_hyperparameters_resolve_and_command_line_keys_win() -> None:
    cfg = compose_points(["experiment=imf-b2-imagenet256"])[0].config
    assert (cfg.method["name"], cfg.model.name, cfg.data.name, cfg.eval.num_samples) == (
        "imf", "dit-b", "latents", 50000)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.betas, cfg.train.warmup_steps) == (
        1024, 1e-4, [0.9, 0.95], 12510)
    assert (cfg.guidance, cfg.method["interval_min"], cfg.method["interval_max"]) == (8.0, 0.4, 0.65)
    assert cfg.data.options["decoder"] == "sd-vae" and cfg.data.options["num_classes"] == 1000
    mine = compose_points(["experiment=imf-b2-imagenet256", "train.lr=3e-4", "nfe=2",
                           "data.root=/elsewhere"])[0].config
    assert (mine.train.lr, mine.nfe, mine.data.root, mine.train.batch_size) == (3e-4, 2, "/elsewhere", 1024)


@pytest.mark.slow
def test_meanflow_xl2_trains_with_its_own_omega_below_the_guidance_axis(capsys) -> None:
    assert main(["experiment=meanflow-xl2-imagenet256", "--dry-run"]) == 0
    identity = json.loads(next(line for line in capsys.readouterr().out.splitlines()
                               if line.startswith('  {"data"')))
    assert (identity["method"]["omega"], identity["method"]["kappa"], identity["method"]["cfg_t_end"]) == (
        0.2, 0.92, 0.75)
    assert main(["experiment=meanflow-xl2-imagenet256", "guidance=2", "--dry-run"]) == 2
    assert "guidance=2 and method.omega=0.2 both set meanflow's training guidance" in capsys.readouterr().err


def test_a_real_run_of_a_preset_without_its_files_fails_in_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli("experiment=scm-cifar10", f"data.root={tmp_path / 'nowhere'}",
                     f"results_dir={tmp_path / 'results'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data=cifar10 data.root=") and "does not exist" in lines[0]
    assert not (tmp_path / "results" / "runs").exists()


def test_unknown_preset_and_python_objects_are_refused(capsys) -> None:
    assert main(["experiment=nosuch", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nosuch'; expected one of: fm-cifar10" in err
    # Config values are data: a Hydra `_target_` names no object here, it is an unknown key.
    assert main(["experiment=fm-cifar10", "+_target_=os.system", "--dry-run"]) == 2
    assert "unknown key '_target_'" in capsys.readouterr().err
    assert main(["experiment=fm-cifar10", "+train._target_=os.system", "--dry-run"]) == 2
    assert "unknown key 'train._target_'" in capsys.readouterr().err
