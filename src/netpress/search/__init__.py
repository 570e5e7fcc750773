"""netpress.search: sensitivity analysis, the compression planner and student NAS (SPEC A1-A3).

* :mod:`netpress.search.sensitivity` — per-layer metric vs sparsity / bits / W8A8 / rank on the
  calibration split, cached, with a heat map (A1).
* :mod:`netpress.search.planner` — ``netpress plan``: Optuna multi-objective search under
  constraints, latency measured on the target runtime, Pareto front, best artifact, resume (A2);
  helped by :mod:`~netpress.search.space`, :mod:`~netpress.search.trial`,
  :mod:`~netpress.search.pareto` and :mod:`~netpress.search.plan_report`.
* :mod:`netpress.search.workers` — in-process and Ray trial executors.
* :mod:`netpress.search.nas` — student width/depth search (A3).

Nothing is imported here: ``netpress.core.recipe`` imports the sensitivity config, and the
planner imports the pipeline, so eager imports would be circular.
"""
