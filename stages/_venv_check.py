"""Imported first by every stage script: a missing package there means `dvc` ran with a Python outside the
project's venv (a `dvc` installed elsewhere starts the `python` it finds first), so say that instead of a traceback.
"""
import sys

_report = sys.excepthook


def _explain(kind, error, traceback):
    missing = getattr(error, "name", None) or ""
    if not issubclass(kind, ModuleNotFoundError) or missing.startswith("alpaca_qlora."):
        _report(kind, error, traceback)  # a module missing inside the project is a bug to see, not a venv problem
        return
    sys.stderr.write(f"{error} (python: {sys.executable}): the stages need the project's venv. Activate it with "
                     "`source .venv/bin/activate` and rerun, or run `make repro` (it builds the venv first).\n")


sys.excepthook = _explain
