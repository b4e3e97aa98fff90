"""Run one training run on Modal: train.py of the lane on GPUs of a given type and count.

A lane whose training goes to Modal uses this app as its training command; `modal run` streams
the remote output (into run.log), exits non-zero when training fails, and stops the remote run
when interrupted, so experiment.py's timeout and triage hold as for a local run. The project (for
prepare.py and the dependencies) is baked into the image; the lane's train.py is sent with each
call, so every experiment runs exactly the file its commit holds. Prepared data lives in the Modal
volume `autoresearch-cache`, filled once by the `prepare` function.

Usage (after `pip install modal` and `modal setup`):
    modal run scripts/cluster/modal_app.py::prepare                     # once: data into the volume
    AUTORESEARCH_MODAL_GPU=H100:8 uv run scripts/loop.py start \\
        --train-command "modal run scripts/cluster/modal_app.py"
Environment: AUTORESEARCH_MODAL_GPU (default H100:1), AUTORESEARCH_MODAL_TIMEOUT (seconds, 1200).
"""

import os
import subprocess
import sys
from pathlib import Path

import modal

GPU = os.environ.get("AUTORESEARCH_MODAL_GPU", "H100:1")  # Modal's "TYPE:COUNT"
GPU_COUNT = int(GPU.rpartition(":")[2]) if ":" in GPU else 1
TIMEOUT_SECONDS = int(os.environ.get("AUTORESEARCH_MODAL_TIMEOUT", "1200"))  # a backstop: experiment.py's comes first
PROJECT = Path(__file__).resolve().parent.parent.parent
REMOTE = "/root/autoresearch"
CACHE = "/cache"

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("uv")
    .add_local_file(PROJECT / "pyproject.toml", f"{REMOTE}/pyproject.toml", copy=True)
    .add_local_file(PROJECT / "uv.lock", f"{REMOTE}/uv.lock", copy=True)
    # bytecode compiled into the image, not again in every container
    .run_commands(f"cd {REMOTE} && uv sync --locked --no-install-project --compile-bytecode")
    .add_local_file(PROJECT / "prepare.py", f"{REMOTE}/prepare.py")
)
volume = modal.Volume.from_name("autoresearch-cache", create_if_missing=True)
app = modal.App("autoresearch", image=image)


@app.function(volumes={CACHE: volume}, timeout=3 * 3600)
def prepare(dataset: str = "climbmix"):
    """Prepare the data once into the volume (CPU only)."""
    env = dict(os.environ, AUTORESEARCH_CACHE=CACHE)
    subprocess.run(["uv", "run", "prepare.py", "--dataset", dataset], cwd=REMOTE, env=env, check=True)
    volume.commit()


@app.function(gpu=GPU, volumes={CACHE: volume}, timeout=TIMEOUT_SECONDS)
def train(train_py: str, seed: str) -> int:
    """Write the lane's train.py beside prepare.py and run it (on several GPUs under torchrun, one
    DDP rank per GPU, as experiment.py --gpus N does); its output streams back as it comes."""
    Path(REMOTE, "train.py").write_text(train_py)
    env = dict(os.environ, AUTORESEARCH_CACHE=CACHE, AUTORESEARCH_SEED=seed, PYTHONUNBUFFERED="1")
    ranks = ["python", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={GPU_COUNT}"]
    return subprocess.run(["uv", "run", *(ranks if GPU_COUNT > 1 else []), "train.py"], cwd=REMOTE, env=env).returncode


@app.local_entrypoint()
def main():
    code = train.remote(Path("train.py").read_text(), os.environ.get("AUTORESEARCH_SEED", "42"))
    sys.exit(code)
