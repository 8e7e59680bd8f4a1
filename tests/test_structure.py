"""The shape of the code: layers, no import cycles, no private crossings, one error policy
per entry point, and one registry per fact (metrics, model sizes).

Every module of ``benchmark/`` and ``methods/`` is read with ``ast``; its imports are
module-level and function-local ones alike (an import inside a function still ties the
two modules together; it only hides the tie from a reader).  The layers, bottom to top,
each importing only its own layer and the ones below:

0. foundation: torch-free facts and plumbing: ``schema``, ``keys``, ``store``, ``cli``,
   ``guard``, ``progress``, ``catalog``, ``config`` (the composer), ``vae_weights``, the metric ids and
   registry (``benchmark.metrics``, ``.registry``), the weight locators
   (``.inception``, ``.reference_batch``), the model-size registry
   (``benchmark.backbones.sizes``) and the method declarations (``methods.specs``);
1. data, backbones and methods: ``benchmark.data``, ``benchmark.backbones``, ``methods``;
2. metrics: the rest of ``benchmark.metrics``;
3. engine: ``plan``, ``flops``, ``sample``, ``ema``, ``distributed``, ``train``,
   ``evaluate``, ``launch``, ``tracking``, ``mirror``, ``benchmark.tuning``;
4. presentation: ``table``, ``compare``, ``plots``;
5. faces (entry points, ``python -m benchmark.X``): ``run``, ``tune``, ``report``,
   ``dashboard``, ``sync``, ``stepcost``, ``encode``.  No module imports a face, not even
   another face (what two faces share lives below them, e.g. ``benchmark.mirror``).
   ``table``, ``flops`` and ``config`` are libraries with a command line: their CLI
   functions (``main`` and what their ``__main__`` block calls) are imported by no one.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("benchmark", "methods")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("benchmark", "benchmark.schema", "benchmark.keys", "benchmark.store", "benchmark.cli",
                    "benchmark.guard", "benchmark.progress", "benchmark.catalog", "benchmark.config", "benchmark.vae_weights",
                    "benchmark.metrics", "benchmark.metrics.registry", "benchmark.metrics.inception",
                    "benchmark.metrics.reference_batch", "benchmark.backbones.sizes", "methods.specs.*")),
    ("data, backbones, methods", ("benchmark.data.*", "benchmark.backbones.*", "methods.*")),
    ("metrics", ("benchmark.metrics.*",)),
    ("engine", ("benchmark.plan", "benchmark.flops", "benchmark.sample", "benchmark.ema", "benchmark.distributed",
                "benchmark.train", "benchmark.evaluate", "benchmark.launch", "benchmark.tracking",
                "benchmark.mirror", "benchmark.tuning.*")),
    ("presentation", ("benchmark.table", "benchmark.compare", "benchmark.plots")),
    ("faces", ("benchmark.run", "benchmark.tune", "benchmark.report", "benchmark.dashboard", "benchmark.sync",
               "benchmark.stepcost", "benchmark.encode")),
]
FACES = set(LAYERS[-1][1])
NOT_CLI = {"benchmark.guard": "runs a command as a guarded process group: its whole argv (--help included) "
                              "belongs to that command; started by benchmark.dashboard, not by a user"}


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = module_files()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    """The layer holding ``module``: an exact name wins over a ``prefix.*`` pattern, and a
    longer pattern over a shorter one."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern == module:
                specificity = 10_000
            elif pattern.endswith(".*") and (module == pattern[:-2] or module.startswith(pattern[:-1])):
                specificity = len(pattern)
            else:
                continue
            if best is None or specificity > best[0]:
                best = (specificity, index)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[1]


@dataclasses.dataclass(frozen=True)
class Import:
    source: str   # the importing module
    target: str   # the imported module (the longest known module the name starts with)
    name: str     # the imported name ("" for ``import x``)
    line: int


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> list[Import]:
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            out += [Import(module, _known(a.name), "", node.lineno) for a in node.names
                    if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            origin = _absolute(module, node)
            if origin.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                out.append(Import(module, full if full in MODULES else _known(origin),
                                  "" if full in MODULES else alias.name, node.lineno))
    return [i for i in out if i.target and i.target != module]


IMPORTS = [i for module in MODULES for i in imports_of(module)]


def where(i: Import) -> str:
    return f"{MODULES[i.source].relative_to(REPO)}:{i.line}"


# ----------------------------------------------------------------------------------------
# Imports


def test_the_modules_import_one_another_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        graph[i.source].add(i.target)
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(MODULES):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
    assert len(state) == len(MODULES) > 60


def test_every_module_imports_only_its_own_layer_and_the_ones_below() -> None:
    upward = [f"{where(i)}: {i.source} ({LAYERS[layer_of(i.source)][0]}) imports {i.target} "
              f"({LAYERS[layer_of(i.target)][0]})"
              for i in IMPORTS if layer_of(i.target) > layer_of(i.source)]
    assert upward == []
    assert {layer_of(m) for m in MODULES} == set(range(len(LAYERS)))  # every layer holds a module


def _cli_names(module: str) -> set[str]:
    """``main`` and the module's own functions its ``__main__`` block calls."""
    tree = TREES[module]
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    used = {n.id for block in _main_blocks(tree) for n in ast.walk(block) if isinstance(n, ast.Name)}
    return ({"main"} | used) & defined


def _main_blocks(tree: ast.Module) -> list[ast.If]:
    return [n for n in tree.body if isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
            and isinstance(n.test.left, ast.Name) and n.test.left.id == "__name__"]


def test_no_module_imports_an_entry_point_or_a_command_line_function() -> None:
    cli = {m: _cli_names(m) for m in MODULES if _main_blocks(TREES[m]) and m not in FACES}
    assert set(cli) >= {"benchmark.table", "benchmark.flops", "benchmark.config"}
    wrong = [f"{where(i)}: {i.source} imports {i.target}" + (f".{i.name}" if i.name else "")
             for i in IMPORTS if i.target in FACES or i.name in cli.get(i.target, ())]
    assert wrong == []


def test_no_module_imports_or_reaches_a_private_name_of_another() -> None:
    crossings = [f"{where(i)}: {i.source} imports {i.target}.{i.name}"
                 for i in IMPORTS if i.name.startswith("_") and not i.name.startswith("__")]
    for module, tree in TREES.items():  # module._name through `import benchmark.x as m` / `from benchmark import x`
        aliases = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                   for a in n.names if a.name.split(".")[0] in PACKAGES and a.asname}
        aliases |= {a.asname or a.name: f"{_absolute(module, n)}.{a.name}" for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) for a in n.names
                    if f"{_absolute(module, n)}.{a.name}" in MODULES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                crossings.append(f"{MODULES[module].relative_to(REPO)}:{node.lineno}: {module} reaches "
                                 f"{aliases[node.value.id]}.{node.attr}")
    assert crossings == []


def test_tuning_uses_only_optuna_public_api() -> None:
    """No ``optuna.<...>._private`` import and no ``x._member`` of an Optuna object (a
    study's ``_storage``, a trial's ``_trial_id``): only ``self`` reaches underscores."""
    found = []
    for module in [m for m in MODULES if m.startswith(("benchmark.tuning", "benchmark.tune"))]:
        for node in ast.walk(TREES[module]):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__" \
                    and any(p.startswith("_") for p in node.module.split(".")):
                found.append(f"{module}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{module}:{node.lineno} .{node.attr}")
    assert found == []
    assert len([m for m in MODULES if m.startswith("benchmark.tuning.")]) >= 5


def test_every_entry_point_goes_through_the_one_error_policy() -> None:
    """Every module with a ``__main__`` block calls ``benchmark.cli.entry`` (imported from
    there) and does not re-import itself there (a task pickled by reference must name the
    module it lives in, never ``__main__``)."""
    bad = []
    with_main = [m for m in MODULES if _main_blocks(TREES[m])]
    for module in with_main:
        tree = TREES[module]
        if module in NOT_CLI:
            continue
        uses_entry = any(i.target == "benchmark.cli" and i.name == "entry" for i in imports_of(module)) and any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "entry" for n in ast.walk(tree))
        if not uses_entry:
            bad.append(f"{module}: no benchmark.cli.entry(...)")
        for block in _main_blocks(tree):
            if any(isinstance(n, ast.ImportFrom) and n.module == module for n in ast.walk(block)):
                bad.append(f"{module}: its __main__ block imports {module} again")
    assert bad == []
    assert set(FACES) <= set(with_main)  # every face is runnable


def test_a_trial_task_pickles_by_reference_to_the_tuning_package() -> None:
    import pickle

    from benchmark.tuning.trial import TrialTask

    assert TrialTask.__module__ == "benchmark.tuning.trial"
    assert b"benchmark.tuning.trial" in pickle.dumps(TrialTask)


# ----------------------------------------------------------------------------------------
# Registries: one place per fact, and an entry needs no other edit


def test_every_model_config_is_generated_from_the_size_registry_and_carries_only_its_backbone_fields() -> None:
    from benchmark.backbones.sizes import CONFIG_FIELDS, MODEL_SIZES, model_yaml

    folder = REPO / "configs" / "model"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(MODEL_SIZES)
    for name, size in MODEL_SIZES.items():
        text = (folder / f"{name}.yaml").read_text()
        assert text == model_yaml(name), ("run python -c 'from benchmark.backbones.sizes import "
                                          "write_model_yamls; write_model_yamls()'")
        fields = yaml.safe_load(text)
        assert fields["name"] == name and fields["backbone"] == size.backbone
        assert set(fields) - {"name", "backbone"} == set(CONFIG_FIELDS[size.backbone])


def test_the_dit_builder_the_planner_and_the_flop_counter_read_the_size_registry() -> None:
    from benchmark.backbones.dit import DIT_SIZES
    from benchmark.backbones.sizes import MODEL_SIZES, dit_sizes

    assert DIT_SIZES == dit_sizes()
    assert dit_sizes()["dit-s"] == {"hidden": 384, "depth": 12, "heads": 6, "patch_size": 2}
    assert MODEL_SIZES["mlp"].config == {"width": 256, "depth": 4}
    for module in ("benchmark.plan", "benchmark.flops", "benchmark.backbones", "benchmark.compare"):
        assert any(i.target == "benchmark.backbones.sizes" for i in imports_of(module)), module
    copies = [m for m in MODULES if m != "benchmark.backbones.sizes" and '"dit-small-cpu"' in MODULES[m].read_text()]
    assert copies == []  # the size list is written once


def test_a_registered_model_size_orders_the_report_without_another_edit(monkeypatch) -> None:
    from benchmark import compare, report
    from benchmark.backbones import sizes

    fake = sizes.ModelSize("dit-nano", "dit", dict(hidden=32, depth=2, heads=2, patch_size=2),
                           {"conditioning_mode": "adaln"}, "a test size")
    monkeypatch.setattr(sizes, "MODEL_SIZES", {"dit-nano": fake, **sizes.MODEL_SIZES})
    rows = pd.DataFrame([{"method": "fm", "model": model, "data": "digits", "seed": 0, "nfe": 1, "nfe_counted": 1.0,
                          "guidance": 1.0, "metric.fd_matched": fd, "sample_flops": 1e6, "sec_per_sample": 1e-3,
                          "grid": None, "train_key": model,
                          "eval_key": model} for model, fd in (("dit-tiny", 2.0), ("dit-nano", 3.0))])
    assert compare.model_order(rows) == ["dit-nano", "dit-tiny"]
    [table] = report.comparisons(rows, "fd_matched")["model_size"]
    assert table.header[1:] == ["model dit-nano", "model dit-tiny"]
    assert "dit-nano" in sizes.model_yaml("dit-nano") and sizes.dit_sizes()["dit-nano"]["hidden"] == 32


FID_METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")


def _fid_rows(metrics: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"method": method, "model": "dit-s", "data": "cifar10", "seed": 0, "nfe": 1,
                          "nfe_counted": 1.0, "guidance": 1.0, "sample_flops": 1e6, "sec_per_sample": 1e-3,
                          "grid": None, "train_key": method,
                          "eval_key": method, **{f"metric.{k}": v * scale for k, v in metrics.items()}}
                         for method, scale in (("fm", 1.0), ("meanflow", 0.5))])


def test_the_fid_suite_tables_show_every_metric_it_records() -> None:
    from benchmark.metrics import registry
    from benchmark.table import metric_info, quality_metric, table_metrics

    assert table_metrics("cifar10") == table_metrics("mnist") == FID_METRICS
    assert registry.suite_metrics("fid") == FID_METRICS and quality_metric("cifar10") == "fd"
    assert [metric_info(m).lower_is_better for m in FID_METRICS] == [True, True, False, False, False, False]
    tables = report_tables(_fid_rows(dict.fromkeys(FID_METRICS, 1.0)))
    assert [t.meta["metric"] for t in tables] == list(FID_METRICS)
    assert [t.title.split(" · ")[2].split(" (")[0] for t in tables] == \
        ["FD", "KID", "precision", "recall", "density", "coverage"]


def report_tables(df: pd.DataFrame) -> list:
    from benchmark import report

    return report.comparisons(df)["method_nfe"]


def test_one_registry_entry_puts_a_new_metric_in_every_table_and_the_tuner(monkeypatch) -> None:
    """Registering ``sharpness`` (higher is better) for the fid suite is the only edit: the
    report's tables, benchmark.run's summary and a study's objective check all know it."""
    from benchmark.metrics import registry
    from benchmark.run import format_table
    from benchmark.table import metric_info, table_metrics

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    registry.register(registry.Metric("sharpness", "sharpness ↑", "maximize", ("fid",), decimals=2))
    assert table_metrics("cifar10") == (*FID_METRICS, "sharpness")
    assert metric_info("sharpness").lower_is_better is False and metric_info("sharpness").format(0.123) == "0.12"
    assert registry.metric_direction("sharpness") == "maximize" and "sharpness" in registry.suite_metrics("fid")

    [*_, sharp] = report_tables(_fid_rows({"fd": 10.0, "sharpness": 0.8}))
    assert sharp.meta["metric"] == "sharpness" and "sharpness ↑ (higher is better)" in sharp.title
    assert [r[0] for r in sharp.rows] == ["fm", "meanflow"]
    record = {"method": "fm", "model": "dit-s", "data": "cifar10", "nfe": 1, "nfe_counted": 1, "guidance": 1.0,
              "metrics": {"fd": 10.0, "sharpness": 0.8}, "sec_per_sample": 0.01}
    header, _, row = format_table([record]).splitlines()[:3]
    assert "sharpness ↑" in header and "| 0.80 " in row and "| 10.0000 " in row  # each metric's own format


def test_metric_facts_live_only_in_the_registry() -> None:
    """The old copies (directions in the catalog, labels and suites in the table) are gone."""
    for module, names in (("benchmark.catalog", ("SUITE_METRICS", "METRIC_DIRECTIONS")),
                          ("benchmark.table", ("METRICS", "QUALITY_METRIC", "TABLE_METRICS", "MetricInfo"))):
        defined = {t.id for n in TREES[module].body if isinstance(n, (ast.Assign, ast.AnnAssign))
                   for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        defined |= {n.name for n in TREES[module].body if isinstance(n, ast.ClassDef)}
        assert not defined & set(names), module
