"""Tuning with Optuna, behind ``python -m benchmark.tune`` (``benchmark/tune.py`` is only the
command line):

- :mod:`~benchmark.tuning.space`: the search space file, its checks, and the Optuna sampler,
  pruner and storage it names;
- :mod:`~benchmark.tuning.trial`: a trial as a benchmark run and :class:`TrialTask`, the job
  a launcher runs for it (pickled by reference to this package, never to ``__main__``);
- :mod:`~benchmark.tuning.study`: the resolved command and its study;
- :mod:`~benchmark.tuning.driver`: asking, launching, telling;
- :mod:`~benchmark.tuning.mirror`: trials in MLflow;
- :mod:`~benchmark.tuning.outputs`: the CSV, the best-trials table, ``best.yaml``, the plots.

Only the public API of Optuna is used: a trial is reached by number through the study,
and by id through the storage's own methods (:class:`~benchmark.tuning.study.StudyHandle`).
"""
