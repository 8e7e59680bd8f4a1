"""Cache identity: spelling does not change a key; what changes results does."""

from __future__ import annotations

from benchmark.config import compose_points
from benchmark.plan import plan_points


def keys(*overrides: str) -> tuple[str, str]:
    plan = plan_points(compose_points(list(overrides)))
    return plan.trainings[0].key, plan.evaluations[0].key


def test_written_defaults_and_int_float_spelling_do_not_change_keys() -> None:
    base = keys("method=fm", "nfe=2")
    assert keys("method=fm", "nfe=2", "train.lr=0.001") == base
    assert keys("method=fm", "nfe=2.0", "guidance=1") == base
    assert keys("nfe=2", "method=fm", "train.steps=3000", "seed=0") == base


def test_logging_and_device_settings_do_not_change_keys() -> None:
    base = keys("method=fm")
    assert keys("method=fm", "train.log_every=7", "train.device=cpu", "train.progress=false",
                "eval.batch_size=17", "tracking.enabled=false") == base


def test_training_fields_change_the_training_key_and_eval_fields_only_the_eval_key() -> None:
    train0, eval0 = keys("method=fm", "nfe=2")
    train1, eval1 = keys("method=fm", "nfe=2", "train.lr=0.002")
    assert train1 != train0 and eval1 != eval0
    train2, eval2 = keys("method=fm", "nfe=4")
    assert train2 == train0 and eval2 != eval0
    train3, _ = keys("method=fm", "method.label_dropout=0.2")
    assert train3 != train0


def test_fields_a_setting_makes_inert_leave_the_training_key() -> None:
    # Shortcut without its EMA teacher: the teacher's decay and ramp-up cannot change the
    # weights, so sweeping them reuses one training; with the teacher on they retrain.
    off = keys("method=shortcut", "method.bootstrap_ema=false")[0]
    assert keys("method=shortcut", "method.bootstrap_ema=false", "method.teacher_decay=0.5",
                "method.teacher_rampup=0")[0] == off
    on = keys("method=shortcut")[0]
    assert off != on
    assert keys("method=shortcut", "method.teacher_decay=0.5")[0] != on
    assert keys("method=shortcut", "method.teacher_rampup=0")[0] != on


def test_method_version_salts_the_training_key(monkeypatch) -> None:
    from methods.specs.fm import FlowMatchingSpec

    before = keys("method=fm")[0]
    monkeypatch.setattr(FlowMatchingSpec, "version", FlowMatchingSpec.version + 1)
    assert keys("method=fm")[0] != before


def test_backbone_version_salts_the_training_key(monkeypatch) -> None:
    import benchmark.plan

    before = keys("method=fm")[0]
    monkeypatch.setitem(benchmark.plan.BACKBONE_VERSIONS, "dit", 99)
    assert keys("method=fm")[0] != before
