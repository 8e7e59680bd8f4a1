"""Build hook (the project's metadata is in pyproject.toml): the wheel ships the top-level
``configs/`` as package data, ``benchmark/configs``, so an installed benchmark composes its
Hydra configs without a checkout, and the report notebook ``reports/benchmark_report.py`` as
``benchmark/reports/benchmark_report.py``, so an installed ``benchmark.report`` executes it.
The top-level files stay the one source of truth; an editable install reads them in place
(``benchmark.config._config_dir``, ``benchmark.report._notebook_source``)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
NOTEBOOK = ROOT / "reports" / "benchmark_report.py"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the editable install reads configs/ itself
        for source in sorted(CONFIGS.rglob("*.yaml")):
            target = Path(self.build_lib) / "benchmark" / "configs" / source.relative_to(CONFIGS)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))
        target = Path(self.build_lib) / "benchmark" / "reports" / NOTEBOOK.name
        self.mkpath(str(target.parent))
        self.copy_file(str(NOTEBOOK), str(target))


setup(cmdclass={"build_py": BuildPyWithConfigs})
