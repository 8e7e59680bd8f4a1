"""Compose configs with Hydra's compose API and expand Hydra sweep overrides.

``python -m benchmark.run method=imf nfe=1,2`` takes Hydra's override grammar; any sweep
form (``a,b``, ``choice(a,b)``, ``range(1,4)``, ``glob(*)`` over a group's files) is a sweep
without ``--multirun``: this module expands the cartesian product and composes one config
per point.  A key given twice and ``interval()`` (continuous) are refused.  Torch-free.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from benchmark.schema import RunConfig, UserError, build_run_config


def _config_dir() -> Path:
    """The configs: installed from a wheel they are package data (``benchmark/configs``,
    copied from the top-level ``configs/`` by setup.py); in a checkout or an editable
    install, the top-level ``configs/`` itself (the source of truth, no copy to go stale)."""
    from importlib.resources import files

    packaged = files("benchmark") / "configs"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "configs"


CONFIG_DIR = _config_dir()
GROUPS = ("method", "model", "data", "train", "eval", "launcher", "experiment")


@dataclass(frozen=True)
class Point:
    """One composed sweep point: the overrides that made it and its resolved config."""

    overrides: tuple[str, ...]
    config: RunConfig


def group_choices(group: str) -> list[str]:
    """Names of the YAML files in ``configs/<group>/``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def expand_overrides(overrides: list[str]) -> list[tuple[str, ...]]:
    """Hydra overrides -> one override list per sweep point (cartesian product, in order)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        bad = str(err).splitlines()[0]
        raise UserError(f"{bad}; expected key=value or key=a,b,c (Hydra override grammar)") from None
    _check_once(parsed)
    axes: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = [f"{key}={v}" for v in _sweep_values(override)]
            if not values:
                raise UserError(f"{override.input_line} is an empty sweep; give at least one value")
            axes.append(values)
        else:
            axes.append([override.input_line])
    return [tuple(point) for point in itertools.product(*axes)]


def _check_once(parsed: list) -> None:
    """A key given twice is refused: Hydra would silently keep the last value."""
    seen: dict[str, str] = {}
    for override in parsed:
        key = override_key(override.input_line)
        if key in seen:
            values = ",".join(o.split("=", 1)[1] for o in (seen[key], override.input_line))
            raise UserError(f"{key} is given twice ({seen[key]} and {override.input_line}); expected it once: "
                            f"{key}={values} sweeps both values")
        seen[key] = override.input_line


def _sweep_values(override) -> list[str]:
    """The values of a sweep: a comma list, choice(), range(), shuffle()/sort() of them,
    or glob() over a config group's files; interval() (continuous) is refused."""
    from hydra.core.override_parser.types import Glob, IntervalSweep

    key, value = override_key(override.input_line), override.value()
    if isinstance(value, IntervalSweep):
        raise UserError(f"{override.input_line}: interval() is a continuous range, which a sweep cannot list; "
                        f"expected a list ({key}=a,b,c), choice(a,b) or range(start,stop,step); "
                        f"python -m benchmark.tune searches intervals")
    if isinstance(value, Glob):
        if key not in GROUPS:
            raise UserError(f"{override.input_line}: glob() picks among a config group's files and {key} is not "
                            f"a group; expected a group ({', '.join(GROUPS)}) or a list {key}=a,b,c")
        names = value.filter(group_choices(key))
        if not names:
            raise UserError(f"{override.input_line} matches no {key}; expected a pattern matching some of: "
                            f"{', '.join(group_choices(key))}")
        return names
    try:
        return list(override.sweep_string_iterator())
    except Exception as err:  # noqa: BLE001 - e.g. range(1,3,step=0): Hydra's own reason, one line
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{override.input_line} is not a sweep that lists values ({reason}); expected "
                        f"a list {key}=a,b,c, choice(a,b) or range(start,stop,step)") from None


def override_key(override: str) -> str:
    """The key an override sets (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(first: list[str], then: list[str]) -> list[str]:
    """``first`` then ``then``, an override in ``then`` replacing one of ``first`` with its key."""
    keys = {override_key(o) for o in then}
    return [o for o in first if override_key(o) not in keys] + list(then)


def read_overrides_file(path: str) -> list[str]:
    """The ``overrides`` list of a YAML file (``benchmark.tune`` exports its best trial as one)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--config {path}: no such file; expected a YAML file with an overrides list "
                        f"(benchmark.tune writes results/tune/<study>/best.yaml)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]}); expected a "
                        f"mapping with an overrides list") from None
    overrides = data.get("overrides") if isinstance(data, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise UserError(f"--config {path} has no overrides list of key=value strings; expected "
                        f"overrides: [method=meanflow, method.ratio_r_neq_t=0.3, ...]")
    return overrides


FREE_FORM = ("launcher.additional", "data.options")
"""Mappings whose keys the user chooses (sbatch options, dataset options): an override of
one of them, or of a key inside, may add keys without Hydra's ``+`` prefix."""


def _declared_keys() -> set[str]:
    """``group.field`` of every field the schema declares: a group's YAML may leave one out
    (``data.root`` of the digits, ``eval.bootstrap``), and setting it is still no typo."""
    import dataclasses

    from benchmark.schema import GROUP_CLASSES

    return {f"{group}.{f.name}" for group, cls in GROUP_CLASSES.items() for f in dataclasses.fields(cls)}


def _open_free_form(override: str) -> str:
    key = override.split("=", 1)[0]
    if key.startswith(("+", "~")):
        return override
    if key in _declared_keys() or any(key == f or key.startswith(f + ".") for f in FREE_FORM):
        return "++" + override
    return override


def check_group_choices(overrides: tuple[str, ...]) -> None:
    """A group is chosen only by the name of a YAML file in its ``configs/<group>/`` folder:
    ``model=../../x`` (a path out of it) or a config path key (``a/b=c``) is refused, so no
    override makes Hydra read a file outside the package's configs."""
    for override in overrides:
        key, sep, value = override.partition("=")
        name = key.lstrip("+~")
        if not sep:
            continue
        if "/" in name:
            raise UserError(f"unknown key '{name}'; expected a config group ({', '.join(GROUPS)}) or a key "
                            f"of the resolved config (see `python -m benchmark.run --help`)")
        if name in GROUPS and value not in group_choices(name):
            raise UserError(f"unknown {name} '{value}'; expected one of: {', '.join(group_choices(name))} "
                            f"(configs/{name}/)")


def compose(overrides: tuple[str, ...]) -> dict:
    """Compose the root config with ``overrides`` (no sweeps) into a plain dict."""
    check_group_choices(overrides)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[_open_free_form(o) for o in overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_explain(err, overrides)) from None


def _explain(err: Exception, overrides: tuple[str, ...]) -> str:
    """Hydra's multi-line errors -> one line naming the value, what was expected, the fix."""
    text = str(err)
    for group in GROUPS:
        if f"Could not find '{group}/" in text or f"'{group}/" in text and "not found" in text:
            bad = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == group), "?")
            return (f"unknown {group} '{bad}'; expected one of: {', '.join(group_choices(group))}"
                    f" (configs/{group}/)")
    if "Could not override '" in text or "Key '" in text:
        marker = "Could not override '" if "Could not override '" in text else "Key '"
        key = text.split(marker, 1)[1].split("'", 1)[0]
        full = next((o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].endswith(key)), key)
        return (f"unknown key '{full.lstrip('+')}'; expected a key of the resolved config: see "
                f"`python -m benchmark.run --help` for the groups and `--dry-run` for every key")
    return text.splitlines()[0]


def compose_points(overrides: list[str]) -> list[Point]:
    """Every sweep point, composed and type-checked."""
    points = []
    for point in expand_overrides(overrides):
        points.append(Point(point, build_run_config(compose(point))))
    return points


def method_yaml(name: str) -> str:
    """The ``configs/method/<name>.yaml`` text for a method: every field of its config
    dataclass with its default, axis and help (a test keeps the files in sync).  A method
    with training defaults of its own (``spec.train_defaults``) gets a global-package file
    that also sets them in the ``train`` group."""
    import dataclasses
    import sys

    from methods.specs import get_spec

    spec = get_spec(name)
    doc = sys.modules[spec.__class__.__module__].__doc__ or name
    indent = "  " if spec.train_defaults else ""
    declared = [c.__module__.replace(".", "/") + ".py" for c in reversed(spec.Config.__mro__)
                if "__dataclass_fields__" in vars(c) and vars(c).get("__annotations__")]
    lines = [f"# {name}: {doc.strip().splitlines()[0]}",
             f"# Generated from {' and '.join(declared)} by `python -m benchmark.config`.",
             "# [train] fields change the checkpoint, [eval] fields are evaluation axes that reuse it."]
    if spec.train_defaults:
        lines = ["# @package _global_", *lines, "method:"]
    lines.append(f"{indent}name: {name}")
    for f in dataclasses.fields(spec.Config):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{indent}{f.name}: {_yaml_value(value)}  # [{f.metadata['axis']}] {f.metadata['help']}")
    if spec.train_defaults:
        lines.append("train:  # this method's training defaults; train.* on the command line still wins")
        lines += [f"  {k}: {_yaml_value(v)}" for k, v in spec.train_defaults.items()]
    return "\n".join(lines) + "\n"


def _yaml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_method_yamls(argv: list[str]) -> int:
    """Rewrite configs/method/<name>.yaml for every registered method from its spec
    (atomically); remove the YAML of a method no spec declares any more."""
    from benchmark.store import atomic_write_bytes
    from methods.specs import METHOD_NAMES

    if argv:
        raise UserError(f"unexpected argument {argv[0]!r}; python -m benchmark.config takes none (see --help)")
    folder = CONFIG_DIR / "method"
    for method_name in METHOD_NAMES:
        path, text = folder / f"{method_name}.yaml", method_yaml(method_name)
        if not path.is_file() or path.read_text() != text:
            atomic_write_bytes(path, text.encode())
            print(f"wrote {path.relative_to(CONFIG_DIR.parent)}")
    for stale in sorted(set(group_choices("method")) - set(METHOD_NAMES)):
        (folder / f"{stale}.yaml").unlink()
        print(f"removed configs/method/{stale}.yaml (no methods/specs/{stale}.py declares it)")
    return 0


METHOD_YAML_HELP = """usage: python -m benchmark.config

Regenerate configs/method/<name>.yaml from the method specs (methods/specs/<name>.py): every
config field with its default, its axis ([train] or [eval]) and its help, plus the method's
training defaults.  Run it after adding a method or changing a spec; tests/test_contract.py
fails while a YAML and its spec disagree."""


if __name__ == "__main__":  # python -m benchmark.config: rewrite configs/method/*.yaml
    import sys

    from benchmark.cli import entry

    sys.exit(entry(write_method_yamls, None, METHOD_YAML_HELP))
