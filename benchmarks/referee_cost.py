"""What the referee costs per experiment now that it scores every one, as a share of an experiment.

Under the helpers, train.py cannot read the evaluation data: it trains, saves the model
(torch.export, AUTORESEARCH_EXPORT) and skips its own evaluation; the referee, a fresh
`python -I` process on a lone copy of prepare.py, checks and loads the artifact, scores val and
runs the causality probe. So the evaluation moves rather than adds, and the net cost per experiment
is the export, the referee's process start and torch import, the archive checks and the load, and
the probe's extra batches.

Runs the real train.py once by hand with AUTORESEARCH_EXPORT set (its summary gives the in-process
evaluation and export seconds), then the referee on the saved model (wall time), then the referee's
phases one by one in another fresh process. Prints the breakdown, the net share, and the referee's
agreement with train.py's own val_bpb.

Uses $AUTORESEARCH_CACHE when it holds data prepared for the profile, else prepares the built-in
corpus for it in a temporary folder first (not timed).

Usage:
    uv run benchmarks/referee_cost.py [--profile cpu|gpu|h100] [--time-budget SECONDS]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
import prepare  # noqa: E402  (budget_text, for the report)

PHASES = """
import json, sys, time
started = time.perf_counter()
import numpy as np, torch
sys.path.insert(0, sys.argv[2])
import prepare
imported = time.perf_counter()
module = prepare.load_saved_model(sys.argv[1])
loaded = time.perf_counter()
rows = np.load(prepare.eval_dir() / "val_rows.npy", mmap_mode="r")
batch = prepare.saved_batch_size(sys.argv[1])
with torch.no_grad():
    prepare.score_rows(module, rows, batch, prepare.get_token_bytes("cpu"))
scored = time.perf_counter()
prepare.check_causality(module, rows, batch)
probed = time.perf_counter()
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "score_s": scored - loaded,
                  "probe_s": probed - scored, "rows": len(rows), "batch": batch}))
"""


def timed(command, env, cwd=PROJECT):
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout


def prepared_cache(profile, time_budget, folder):
    """A cache with data for `profile`: $AUTORESEARCH_CACHE if it has it, else the built-in corpus in `folder`."""
    cache = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
    manifest = cache / "prepared" / "prepared.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("profile") == profile and time_budget is None:
        return cache
    args = ["--dataset", "builtin", "--profile", profile] + (["--time-budget", str(time_budget)] if time_budget else [])
    print(f"preparing the built-in corpus for the {profile} profile in {folder} (not timed)", flush=True)
    subprocess.run([sys.executable, str(PROJECT / "prepare.py"), *args], env=dict(os.environ, AUTORESEARCH_CACHE=str(folder)),
                   check=True, capture_output=True)
    return Path(folder)


def summary_value(log, key):
    return re.search(rf"^{key}:\s*(.*)$", log, re.MULTILINE).group(1).strip()


def main():
    parser = argparse.ArgumentParser(description="Net cost of the referee scoring every experiment.")
    parser.add_argument("--profile", default="cpu", choices=["cpu", "gpu", "h100"], help="protocol profile (default cpu)")
    parser.add_argument("--time-budget", type=int, help="override a GPU profile's training seconds (a shorter run "
                        "makes the referee look relatively dearer; the cpu profile's budget is tokens)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        cache = prepared_cache(args.profile, args.time_budget, temporary / "cache")
        manifest = json.loads((cache / "prepared" / "prepared.json").read_text())
        model = temporary / "out" / "model.pt2"
        model.parent.mkdir()
        env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_EXPORT=str(model), PYTHONUNBUFFERED="1")
        env.pop("AUTORESEARCH_PROFILE", None)
        experiment_s, log = timed([sys.executable, "train.py"], env)
        val_bpb, eval_s, export_s = (float(summary_value(log, key)) for key in ("val_bpb", "eval_seconds", "export_seconds"))
        device = summary_value(log, "device")
        lone = temporary / "referee"
        lone.mkdir()
        shutil.copy(PROJECT / "prepare.py", lone)
        env.pop("AUTORESEARCH_EXPORT")
        referee_s, scored = timed([sys.executable, "-I", str(lone / "prepare.py"), "score", str(model)], env, cwd=lone)
        referee_bpb = float(summary_value(scored, "val_bpb"))
        _, phases = timed([sys.executable, "-I", "-c", PHASES, str(model), str(lone)], env, cwd=lone)
        phases = json.loads(phases)
        size_mb = model.stat().st_size / 1e6

    before = experiment_s - export_s  # the experiment as it was: train.py evaluating itself, nothing saved
    net = export_s + referee_s - eval_s

    def share(seconds):
        return f"{seconds:.1f} s = {100 * seconds / before:.1f}%"

    print(f"experiment by hand: train.py on the {manifest['profile']} profile ({prepare.budget_text(manifest)} budget, "
          f"{manifest['eval_tokens']:,} eval tokens, {device}): {before:.1f} s wall with its own evaluation "
          f"({eval_s:.1f} s), without the export")
    print(f"export in train.py (torch.export, functionalise, save; {size_mb:.0f} MB model.pt2): {share(export_s)}")
    print(f"referee (python -I prepare.py score, fresh process): {share(referee_s)}: start and imports "
          f"{phases['import_s']:.1f} s, checks and load {phases['load_s']:.1f} s, scoring {phases['rows']} rows "
          f"{phases['score_s']:.1f} s, probe at batch {phases['batch']} {phases['probe_s']:.1f} s")
    print(f"train.py no longer evaluates under the helpers: -{eval_s:.1f} s")
    print(f"net cost per experiment: {share(net)} of an experiment (target at most 10%)")
    print(f"agreement: referee {referee_bpb:.6f} vs train.py's {val_bpb:.6f} ({referee_bpb - val_bpb:+.1e})")


if __name__ == "__main__":
    main()
