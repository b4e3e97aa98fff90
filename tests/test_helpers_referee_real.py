"""The referee for real: torch-exported models re-scored by the real prepare.py in a fresh process.

A fake trainer (tests/fixtures/fake_train/torch_cheat.py) saves a real model with the real
prepare.save_for_referee against conftest's prepared builtin cache, then prints a val_bpb its
monkeypatched evaluation made up (0.1). experiment.py's referee must call it `invalid`: the model
scores nowhere near the number printed. (A model that looks ahead is caught by the same probe in
train.py's own evaluation and in the referee's: tests/test_train.py runs it for real, and
test_helpers_trust.py checks how the helpers record it.) About 20 s on two idle cores.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import copy_project

PROJECT = Path(__file__).resolve().parent.parent
CHEAT = PROJECT / "tests" / "fixtures" / "fake_train" / "torch_cheat.py"


# In the referee (argv has "score") it marks and breaks the scoring; in training (which imports the
# repository's prepare.py from the root) it steps aside for the real numpy.
SHADOW = """import os, sys
if "score" in sys.argv:
    try:
        open({marker!r}, "w").write("imported")
    finally:
        raise SystemExit("shadowed numpy ran in the referee")
del sys.modules["numpy"]
sys.path = [path for path in sys.path if path not in ("", os.getcwd())]
import numpy
"""


def run(args, cwd, env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_real_referee_catches_a_monkeypatched_evaluation(tmp_path, builtin_cache):
    repo = copy_project(tmp_path)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(builtin_cache))
    for key in ("AUTORESEARCH_SEED", "AUTORESEARCH_PROFILE"):
        env.pop(key, None)
    assert run(["scripts/setup.py", "--tag", "referee", "--noise-runs", "0"], repo, env).returncode == 0

    env["AUTORESEARCH_TRAIN_COMMAND"] = f"{shlex.quote(sys.executable)} {shlex.quote(str(CHEAT))}"
    # An untracked numpy.py at the root, which `python prepare.py score` run from the root would import:
    # the referee runs `python -I` on a copy of prepare.py in an empty folder, so it never does.
    marker = tmp_path / "numpy-imported"
    (repo / "numpy.py").write_text(SHADOW.format(marker=str(marker)))
    result = run(["scripts/experiment.py", "monkeypatched evaluation"], repo, env)
    assert not marker.exists()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "invalid (referee): train.py printed val_bpb 0.100000, but the referee scored its saved model" \
        in result.stdout, result.stdout
    assert "recorded as invalid" in run(["scripts/decide.py", "keep"], repo, env).stdout
    (row,) = (repo / "results.tsv").read_text().splitlines()[1:]
    assert row.split("\t")[1:4] == ["0.000000", "0.0", "invalid"]
    assert not list((repo / "runs").glob("*/out/model.pt2"))  # deleted with the discard
