"""The metric registry: every fact about a metric in one entry (torch-free).

One :class:`Metric` per recorded metric: its heading, which way is better, the metric
suites that record it (a tuning objective must be one of its dataset's suite's), whether
it gets a column in comparison tables, the floor measured beside it and how it is printed.
The tables (``benchmark.table``), the report, the plots, ``benchmark.run``'s summary and
``benchmark.tune`` read it through the functions below, at call time: registering a new
metric (:func:`register`) is the only edit a new metric needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class Metric:
    name: str
    label: str                      # heading in tables and plots
    direction: str | None           # "minimize" / "maximize"; None: not a score (a floor, a diagnostic)
    suites: tuple[str, ...] = ()    # metric suites (benchmark.catalog.DatasetInfo.metric) recording it
    tabled: bool = True             # a column of the comparison tables of those suites
    floor: str = ""                 # the metric holding a perfect generator's value, measured alike
    ranked: bool = True             # tables mark its best value (False: a diagnostic shown beside)
    decimals: int = 4               # printed as a fixed-point number with this many decimals...
    tiny: float = 1e-3              # ...or in scientific notation below this magnitude

    @property
    def lower_is_better(self) -> bool | None:
        """For tables and plots: None when no value is marked best."""
        return None if self.direction is None or not self.ranked else self.direction == "minimize"

    def format(self, value: float | None) -> str:
        if value is None or value != value:
            return "-"
        if value == 0 or abs(value) >= self.tiny:
            return f"{value:.{self.decimals}f}"
        return f"{value:.2e}"


REGISTRY: dict[str, Metric] = {}
"""Every metric by name, in the order tables show them (a suite's headline is named in
:data:`HEADLINES`)."""

HEADLINES = {"digits": "fd_matched", "toy": "sw2", "fid": "fd"}
"""The headline metric of each suite: the first table column, the default of plots."""


def register(metric: Metric) -> Metric:
    if metric.direction not in (*DIRECTIONS, None):
        raise ValueError(f"metric {metric.name}: direction={metric.direction!r}; expected one of {DIRECTIONS} or None")
    REGISTRY[metric.name] = metric
    return metric


def metric(name: str) -> Metric:
    """The registered metric, or an unregistered one labelled by its name (never 'best')."""
    return REGISTRY.get(name) or Metric(name, name, None)


def metric_direction(name: str) -> str:
    direction = metric(name).direction
    if direction is None:
        raise KeyError(f"metric {name} has no direction")
    return direction


def suite_metrics(suite: str) -> tuple[str, ...]:
    """The scores a suite records, in registry order (what a tuning study may optimise;
    floors have no direction and are not among them)."""
    return tuple(m.name for m in REGISTRY.values() if suite in m.suites and m.direction is not None)


def table_metrics(suite: str) -> tuple[str, ...]:
    """The metrics with a column in the suite's comparison tables, headline first."""
    names = [m.name for m in REGISTRY.values() if suite in m.suites and m.tabled]
    head = HEADLINES.get(suite)
    return tuple(sorted(names, key=lambda n: n != head))


def headline(suite: str) -> str:
    return HEADLINES.get(suite, "fd")


class FloorView(Mapping):
    """``{metric: its floor metric}`` read from the registry at each use."""

    def __getitem__(self, name: str) -> str:
        floor = REGISTRY[name].floor
        if not floor:
            raise KeyError(name)
        return floor

    def __iter__(self) -> Iterator[str]:
        return iter([m.name for m in REGISTRY.values() if m.floor])

    def __len__(self) -> int:
        return sum(1 for m in REGISTRY.values() if m.floor)


FLOORS = FloorView()

DIGITS, TOY, FID = ("digits",), ("toy",), ("fid",)
for _entry in (
    Metric("fd_matched", "FD@297",       "minimize", DIGITS, floor="fd_floor"),
    Metric("fd",         "FD",           "minimize", DIGITS + FID),
    Metric("kid",        "KID",          "minimize", DIGITS + FID, floor="kid_floor"),
    Metric("class_acc",  "class acc",    "maximize", DIGITS),
    Metric("memorized",  "memorised",    "minimize", DIGITS, ranked=False),  # a diagnostic
    Metric("sw2",        "SW2",          "minimize", TOY),
    Metric("swd",        "SWD",          "minimize", TOY),
    Metric("mmd",        "MMD",          "minimize", TOY),
    Metric("mean_err",   "mean error",   "minimize", TOY, tabled=False),
    Metric("std_err",    "std error",    "minimize", TOY, tabled=False),
    Metric("precision",  "precision",    "maximize", FID),
    Metric("recall",     "recall",       "maximize", FID),
    Metric("density",    "density",      "maximize", FID),
    Metric("coverage",   "coverage",     "maximize", FID),
    Metric("fd_floor",   "FD@297 floor", None, DIGITS, tabled=False),
    Metric("kid_floor",  "KID floor",    None, DIGITS, tabled=False),
):  # fmt: skip
    register(_entry)
