"""A stage script imported as a module, so a test or bench calls the stage's own functions rather than copying
their sequence. stages/ is not a package: each script and its neighbour `_venv_check` (which it imports first) are
loaded by file, and no sys.path edit is made."""
from __future__ import annotations

import importlib.util
import sys
from typing import Any

from support import ROOT


def stage_script(name: str) -> Any:
    """stages/<name>.py as the module `<name>_stage`."""
    _load_script("_venv_check", "_venv_check")
    return _load_script(name, f"{name}_stage")


def _load_script(name: str, as_name: str) -> Any:
    if as_name in sys.modules:
        return sys.modules[as_name]
    spec = importlib.util.spec_from_file_location(as_name, ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = module
    spec.loader.exec_module(module)
    return module
