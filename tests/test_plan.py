"""Sweep planning: training vs evaluation axes and points a method cannot honour."""

from __future__ import annotations

import pytest

from benchmark.config import compose_points
from benchmark.plan import plan_points
from benchmark.schema import UserError
from tests.conftest import run_cli


def plan(*overrides: str):
    return plan_points(compose_points(list(overrides)))


def test_nfe_and_fm_guidance_are_evaluation_axes() -> None:
    p = plan("method=fm", "nfe=1,2,4", "guidance=1,3")
    assert len(p.trainings) == 1 and len(p.evaluations) == 6
    assert sorted(e.nfe_counted for e in p.evaluations) == [1, 2, 2, 4, 4, 8]


def test_meanflow_guidance_becomes_a_training_axis_with_a_notice() -> None:
    p = plan("method=meanflow", "nfe=1,2", "guidance=1,2")
    assert len(p.trainings) == 2 and len(p.evaluations) == 4
    assert sorted(j.method_train["omega"] for j in p.trainings) == [1.0, 2.0]
    assert len(p.notices) == 1 and "training axis" in p.notices[0]
    assert all(e.nfe_counted == e.nfe for e in p.evaluations)  # guidance costs no pass at sampling


def test_imf_guidance_and_interval_reuse_one_checkpoint_at_no_extra_cost() -> None:
    p = plan("method=imf", "nfe=1", "guidance=1,4,8", "method.interval_min=0.0,0.4")
    assert len(p.trainings) == 1 and len(p.evaluations) == 6
    assert all(e.nfe_counted == 1 for e in p.evaluations)


def test_multi_method_sweep_skips_illegal_points_with_a_notice() -> None:
    p = plan("method=fm,shortcut,scm", "nfe=1,3,4")
    assert len(p.trainings) == 3
    # fm: 1,3,4; shortcut: 1,4; scm: 1
    assert len(p.evaluations) == 6
    assert any("shortcut cannot sample with nfe=3" in s for s in p.skipped)
    assert any("scm cannot sample with nfe=4" in s for s in p.skipped)


def test_single_method_with_an_illegal_point_is_an_error_naming_allowed_values() -> None:
    with pytest.raises(UserError, match=r"allowed: nfe=1,2,4,8,16,32,64,128"):
        plan("method=shortcut", "nfe=1,3")


def test_every_point_illegal_exits_2_naming_allowed_values() -> None:
    result = run_cli("method=scm,shortcut", "nfe=3", "--dry-run")
    assert result.returncode == 2
    assert "allowed: nfe=" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_guidance_on_unconditional_data_is_rejected() -> None:
    with pytest.raises(UserError, match="unconditional"):
        plan("method=fm", "data=gaussian1d", "model=mlp", "train=toy", "guidance=2")


def test_scm_has_no_guidance() -> None:
    with pytest.raises(UserError, match="expected guidance=1"):
        plan("method=scm", "guidance=2")


def test_dry_run_marks_cached_rows_after_a_run(toy_overrides) -> None:
    from benchmark.run import main

    assert main([*toy_overrides, "method=fm", "nfe=1", "tracking.enabled=false"]) == 0
    result = run_cli(*toy_overrides, "method=fm", "nfe=1,2", "--dry-run")
    assert result.returncode == 0
    assert result.stdout.count("[cached]") == 2  # the training and nfe=1
    assert result.stdout.count("[missing]") == 1  # nfe=2


def test_the_evaluation_ema_is_one_rule_for_every_method_and_the_teacher_a_method_field() -> None:
    trains = {m: plan(f"method={m}").trainings[0] for m in ("fm", "shortcut")}
    assert trains["fm"].config.train == trains["shortcut"].config.train  # same EMA profiles
    assert trains["shortcut"].method_train["teacher_decay"] == 0.99
    slow = plan("method=shortcut", "method.teacher_decay=0.999").trainings[0]
    assert slow.method_train["teacher_decay"] == 0.999 and slow.key != trains["shortcut"].key


def test_ema_widths_are_evaluation_axes_of_one_training() -> None:
    p = plan("method=meanflow", "nfe=1", "eval.ema=raw,0.05,0.1")
    assert len(p.trainings) == 1 and [ev.eval.ema for ev in p.evaluations] == ["raw", 0.05, 0.1]
    assert len({ev.key for ev in p.evaluations}) == 3
    for bad in ("eval.ema=0.5", "eval.ema=ema", "eval.ema=0", "train.ema_profiles=[0.05,0.05]"):
        with pytest.raises(UserError, match="expected"):
            plan(bad)
