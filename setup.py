"""Build hook (the project's metadata is in pyproject.toml): the wheel ships the top-level
``configs/`` as package data, ``benchmark/configs``, so an installed benchmark composes its
Hydra configs without a checkout.  ``configs/`` stays the one source of truth; an editable
install reads it in place (``benchmark.config._config_dir``)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the editable install reads configs/ itself
        for source in sorted(CONFIGS.rglob("*.yaml")):
            target = Path(self.build_lib) / "benchmark" / "configs" / source.relative_to(CONFIGS)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithConfigs})
