"""benchmarks/gpu_check.py --dry-run: the GPU measurement script, run on the CPU so that it keeps working."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_measures_both_runs_and_writes_one_json(tmp_path):
    figures_file = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json",
                             str(figures_file)], cwd=tmp_path, capture_output=True, text=True, timeout=1100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(figures_file.read_text())
    assert figures["dry_run"] and figures["profile"] == "cpu" and set(figures["runs"]) == {"cold", "warm"}
    for run in figures["runs"].values():
        assert run["tokens_per_sec"] > 0 and run["num_steps"] >= 1
        assert {"mfu_percent", "mfu_upstream_percent", "peak_vram_mb"} <= set(run)
        assert set(run["overhead_seconds"]) == {"process_start", "startup_and_compile", "evaluation", "export", "referee"}
        assert run["within_tolerance"] and abs(run["referee_difference"]) <= figures["referee_tolerance_bpb"]
    assert result.stdout.count("val_bpb train.py") == 2 and "figures written to" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]  # its temporary folder is gone
