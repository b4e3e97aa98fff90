"""The set-up (`uv sync --compile-bytecode`): what a fresh clone gets before its first experiment."""

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.parametrize("package", ["torch", "numpy"])
def test_what_the_sandbox_imports_is_compiled_before_the_first_run(package):
    # Every training and referee process imports these inside the sandbox, where the venv is
    # read-only: a module without its bytecode would be compiled from source again in every run.
    root = Path(importlib.util.find_spec(package).origin).parent
    stale = [source for source in root.rglob("*.py")
             if not (cached := Path(importlib.util.cache_from_source(source))).exists()
             or cached.stat().st_mtime < source.stat().st_mtime]
    # A file written for a newer Python does not compile on this one (torch 2.15: 1, for 3.12).
    assert len(stale) <= 2, (f"{len(stale)} of {package}'s modules have no bytecode (first: {stale[:3]}); "
                             "run `uv sync --compile-bytecode`")
