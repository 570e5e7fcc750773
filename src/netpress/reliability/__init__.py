"""Reliability and security checks behind ``netpress reliability`` (and ``tests/reliability``).

Each ``run_*`` function runs one family of cases and returns a :class:`Section` (cases run, the
failures with what went wrong); :func:`run_all` writes ``RELIABILITY.md``. One module per family:

* :mod:`~netpress.reliability.fuzz`: generated malformed recipes through ``Recipe.from_dict``,
  ``Recipe.load`` and ``netpress compress``;
* :mod:`~netpress.reliability.tamper`: damaged artifacts must raise ``ArtifactError``;
* :mod:`~netpress.reliability.nopickle`: artifacts load without unpickling, malicious pickles refused;
* :mod:`~netpress.reliability.crash`: signals while writing an output directory;
* :mod:`~netpress.reliability.health`: determinism and NaN/Inf / ``--max-drop``;
* :mod:`~netpress.reliability.memory`: peak RSS of GPTQ / SparseGPT on MiniLM;
* :mod:`~netpress.reliability.report`: :func:`run_all` and the markdown.

Example:
    >>> from netpress.reliability import run_fuzz  # doctest: +SKIP
    >>> run_fuzz(50).failures  # doctest: +SKIP
    []
"""

from netpress.reliability.common import BASE_RECIPE, Section
from netpress.reliability.crash import MOMENTS, crash_case, run_crash, swap_crash_case
from netpress.reliability.fuzz import (
    RECIPE_NAME,
    TOP_KEYS,
    Malformed,
    check_case,
    check_cli,
    check_from_dict,
    check_load,
    malformed_recipes,
    run_fuzz,
)
from netpress.reliability.health import COVERED, covered_digest, run_determinism, run_health
from netpress.reliability.memory import peak_rss, run_memory
from netpress.reliability.nopickle import evil_model_files, no_pickle_anywhere, run_pickle
from netpress.reliability.report import FINDINGS, render, run_all
from netpress.reliability.tamper import (
    ARTIFACT_FILES,
    Tamper,
    _flip,
    _truncate,
    build_artifact,
    check_tamper,
    run_tamper,
    tamper_cases,
)

__all__ = [
    "ARTIFACT_FILES", "BASE_RECIPE", "COVERED", "FINDINGS", "MOMENTS", "RECIPE_NAME", "TOP_KEYS",
    "Malformed", "Section", "Tamper", "_flip", "_truncate", "build_artifact", "check_case",
    "check_cli", "check_from_dict", "check_load", "check_tamper", "covered_digest", "crash_case",
    "evil_model_files", "malformed_recipes", "no_pickle_anywhere", "peak_rss", "render", "run_all",
    "run_crash", "run_determinism", "run_fuzz", "run_health", "run_memory", "run_pickle",
    "run_tamper", "swap_crash_case", "tamper_cases",
]
