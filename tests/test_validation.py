"""Every field of every config group and of every method's config is checked while planning.

The cases are generated from the declarations themselves (``benchmark.schema``'s group
dataclasses and each method spec's ``Config``): for every field a value of the wrong type,
and for every declared constraint a value that breaks it (below ``min``, at ``gt``, above
``max``, at ``lt``, outside ``choices``, empty where ``nonempty``).  Each must be refused by
the planner, in-process, with a :class:`UserError` naming the key and the bad value, so a
field added later without a working check fails here.

Every case runs twice: in the default suite on a config composed once per method with the
bad value (read by Hydra's override grammar) put in its place, then planned; in the slow
stage through ``plan_points(compose_points([...]))`` from the override itself, as the
command line does (a Hydra composition costs ~0.3 s, ~80 s for all cases on 2 cores).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing

import pytest

from benchmark.config import Point, compose, compose_points, group_choices
from benchmark.plan import plan_points
from benchmark.schema import GROUP_CLASSES, UserError, _TopLevel, build_run_config
from methods.specs import METHOD_NAMES, get_spec

FREE_FORM_CONTENT = {
    "data.options": "its keys and values are the dataset loader's options; the loader (which imports torch) "
                    "checks them when it loads, before the first step",
    "launcher.additional": "sbatch options of the user's cluster; sbatch itself refuses a bad one when the jobs "
                           "are submitted (one line, exit 2: tests/test_slurm.py)",
}
"""Mappings whose content is the user's own: only their type is checked while planning."""


def _plain_type(tp: typing.Any) -> typing.Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _float_text(value: float) -> str:
    return repr(float(value))


def _wrong_type(tp: typing.Any) -> str:
    """An override value Hydra reads as something other than ``tp``."""
    return "3" if _plain_type(tp) is str else "maybe" if _plain_type(tp) is bool else "abc"


def _bad_values(meta: typing.Mapping, tp: typing.Any) -> list[tuple[str, str]]:
    """(override value, what the error must show) per way to break the field; the wrong
    type first unless a declared constraint exists (then that constraint first)."""
    tp = _plain_type(tp)
    number = (lambda v: str(int(v))) if tp is int else _float_text
    cases = []
    if meta.get("choices"):
        cases.append(("nosuch", "nosuch"))
    if meta.get("min") is not None:
        cases.append((number(meta["min"] - (1 if tp is int else 0.5)),) * 2)
    if meta.get("gt") is not None:
        cases.append((number(meta["gt"]),) * 2)
    if meta.get("max") is not None:
        cases.append((number(meta["max"] + (1 if tp is int else 0.5)),) * 2)
    if meta.get("lt") is not None:
        cases.append((number(meta["lt"]),) * 2)
    if meta.get("nonempty"):
        cases.append(("", ""))
    wrong = _wrong_type(tp)
    cases.append((wrong, wrong))
    return cases


def _schema_fields() -> list[tuple[str, typing.Any, typing.Mapping, list[str]]]:
    out = []
    for prefix, cls in [*GROUP_CLASSES.items(), ("", _TopLevel)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            out.append((key, hints[f.name], f.metadata, []))
    return out


def _method_fields() -> list[tuple[str, typing.Any, typing.Mapping, list[str]]]:
    out = []
    for name in METHOD_NAMES:
        config = get_spec(name).Config
        hints = typing.get_type_hints(config)
        out += [(f"method.{f.name}", hints[f.name], f.metadata, [f"method={name}"])
                for f in dataclasses.fields(config)]
    return out


def _cases() -> list:
    params = []
    for key, tp, meta, base in _schema_fields() + _method_fields():
        for value, shown in _bad_values(meta, tp):
            where = f"{base[0]}:" if base else ""
            params.append(pytest.param(base, key, value, shown, id=f"{where}{key}={value!r}"))
    return params


@functools.cache
def _composed(base: tuple[str, ...]) -> dict:
    return compose(base)


def _substituted(base: list[str], key: str, value: str) -> list[Point]:
    """The points of ``[*base, key=value]`` with ``base`` composed once: the value, as
    Hydra's grammar reads it, replaces the composed one (what a composition does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    raw = copy.deepcopy(_composed(tuple(base)))
    *path, last = key.split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = OverridesParser.create().parse_override(f"{key}={value}").value()
    return [Point((*base, f"{key}={value}"), build_run_config(raw))]


def _refused(plan: typing.Callable[[], object], key: str, shown: str) -> None:
    with pytest.raises(UserError) as err:
        plan()
    message = str(err.value)
    assert f"{key}=" in message, message
    assert shown in message.split(f"{key}=", 1)[1], message
    assert "\n" not in message


@pytest.mark.parametrize(("base", "key", "value", "shown"), _cases())
def test_a_bad_value_of_any_field_is_refused_while_planning_naming_key_and_value(
        base: list[str], key: str, value: str, shown: str) -> None:
    _refused(lambda: plan_points(_substituted(base, key, value)), key, shown)


@pytest.mark.slow
@pytest.mark.parametrize(("base", "key", "value", "shown"), _cases())
def test_a_bad_value_of_any_field_on_the_command_line_is_refused_while_planning(
        base: list[str], key: str, value: str, shown: str) -> None:
    _refused(lambda: plan_points(compose_points([*base, f"{key}={value}"])), key, shown)


def test_every_choice_declared_in_a_method_help_text_is_a_real_choices_check() -> None:
    """A help text listing alternatives ("euler | heun") declares them as ``choices``."""
    listed = [(name, f.name) for name in METHOD_NAMES for f in dataclasses.fields(get_spec(name).Config)
              if " | " in f.metadata["help"] and not f.metadata.get("choices")]
    assert listed == []
    solver = next(f for f in dataclasses.fields(get_spec("fm").Config) if f.name == "solver")
    assert solver.metadata["choices"] == ("euler", "heun")


def test_only_the_free_form_mappings_leave_their_content_unchecked() -> None:
    mappings = [key for key, tp, _, _ in _schema_fields() if _plain_type(tp) is dict]
    assert sorted(mappings) == sorted(FREE_FORM_CONTENT)


def test_every_field_has_a_generated_case() -> None:
    params = _cases()
    keys = {p.values[1] for p in params}
    fields = {key for key, *_ in _schema_fields() + _method_fields()}
    assert keys == fields
    assert len(params) >= 2 * len(fields) - 30  # most fields have a constraint besides their type


@pytest.mark.parametrize(("overrides", "says"), [
    (["method=scm", "method.t_max=1.2", "method.t_mid=1.5"], "method.t_mid=1.5 is above method.t_max=1.2"),
    (["method=meanflow", "method.cfg_t_start=0.8", "method.cfg_t_end=0.2"], "method.cfg_t_start=0.8"),
    (["method=imf", "method.interval_min=0.8", "method.interval_max=0.2"], "[0.8, 0.2]"),
    (["method=imf", "method.v_head=aux", "method.aux_depth=4"], "method.aux_depth=4 leaves no shared trunk"),
    (["method=shortcut", "method.denoise_timesteps=12"], "method.denoise_timesteps=12 is not a power of two"),
    (["train.batch_size=128", "train.micro_batches=3"], "train.batch_size=128 does not split"),
    (["model.name=dit-q"], "model.name='dit-q' is not a DiT size"),
    (["tracking.uri=foo://x"], "tracking.uri='foo://x' has the scheme 'foo:'"),
    (["tracking.uri=sqlite://x.db"], "tracking.uri='sqlite://x.db' is not a sqlite URI"),
    (["guidance=2", "method=meanflow", "method.omega=3"], "guidance=2 and method.omega=3 both set"),
    (["data=gaussian1d", "model=mlp", "guidance=2"], "needs class labels"),
    (["method=scm", "nfe=4"], "allowed: nfe=1,2"),
])
def test_rules_across_fields_are_refused_while_planning(overrides: list[str], says: str) -> None:
    with pytest.raises(UserError) as err:
        plan_points(compose_points(overrides))
    assert says in str(err.value)


@pytest.mark.parametrize("uri", ["", "sqlite:///results/mlflow.db", "sqlite:////abs/mlflow.db", "file:/tmp/mlruns",
                                 "/tmp/mlruns", "http://127.0.0.1:5000", "https://mlflow.example.org",
                                 "postgresql+psycopg2://u@h/db", "databricks"])
def test_tracking_uris_mlflow_opens_are_accepted(uri: str) -> None:
    [point] = compose_points([f"tracking.uri='{uri}'"])
    assert point.config.tracking.uri == uri


def test_the_accepted_tracking_schemes_are_those_mlflow_registers() -> None:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from benchmark.schema import TRACKING_SCHEMES

    assert set(TRACKING_SCHEMES) == set(_tracking_store_registry._registry) - {""}


def test_a_sweep_over_a_group_by_glob_expands_to_its_files_and_interval_is_refused() -> None:
    methods = [p.config.method["name"] for p in compose_points(["method=glob(*,exclude=fm)"])]
    assert methods == [m for m in group_choices("method") if m != "fm"] and len(methods) >= 4
    with pytest.raises(UserError, match=r"interval\(\) is a continuous range"):
        compose_points(["train.lr=interval(0.001,0.1)"])
    with pytest.raises(UserError, match="nfe is given twice .* nfe=1,2 sweeps both"):
        compose_points(["nfe=1", "nfe=2"])


def test_the_bounds_of_a_field_read_as_numbers_in_the_error() -> None:
    with pytest.raises(UserError) as err:
        plan_points(compose_points(["method=scm", "method.t_max=2"]))
    assert f"> 0 and <= {math.pi / 2:g}" in str(err.value)
