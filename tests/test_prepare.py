"""prepare.py: data sources, downloads against a real HTTP server, tokenizer, packing, val_bpb."""

import http.server
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, run_prepare, synthetic_documents

sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402

SMALL = ["--profile", "cpu", "--eval-tokens", str(4 * 256)]


@pytest.fixture
def prepared_module(builtin_cache, monkeypatch):
    """prepare imported against the builtin cache (its manifest is read lazily, once)."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(builtin_cache))
    monkeypatch.delenv("AUTORESEARCH_PROFILE", raising=False)
    monkeypatch.delenv("AUTORESEARCH_DATASET", raising=False)
    module = importlib.reload(prepare)
    yield module
    importlib.reload(prepare)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def test_tokenizer_round_trips_and_token_bytes_match(prepared_module):
    tokenizer = prepared_module.Tokenizer.from_prepared()
    assert tokenizer.get_vocab_size() == prepared_module.VOCAB_SIZE == 4096
    for text in ["def f(x):\n    return x ** 2\n", "héllo wörld 🌍", "日本語", "", "  \t\n"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    table = np.load(builtin_cache_path(prepared_module) / "token_bytes.npy")
    assert table[tokenizer.get_bos_token_id()] == 0
    encoding = tokenizer.encoding
    for token_id in range(0, tokenizer.get_vocab_size() - 1, 97):
        assert table[token_id] == len(encoding.decode_single_token_bytes(token_id)) > 0
    assert (table > 0).sum() == tokenizer.get_vocab_size() - 1


def builtin_cache_path(module):
    return module.require_prepared_dir()


# ---------------------------------------------------------------------------
# Packing and the dataloader
# ---------------------------------------------------------------------------

def write_cache(folder, lengths):
    """A token cache whose document i is `lengths[i]` copies of the token i + 1 (BOS is 0)."""
    tokens = np.concatenate([np.full(n, i + 1, dtype=np.uint16) for i, n in enumerate(lengths)])
    tokens.tofile(folder / "train_tokens.bin")
    np.save(folder / "train_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return prepare.TokenCache(folder, "train")


def segments(row):
    starts = list(np.flatnonzero(row == 0)) + [len(row)]
    return [row[a + 1:b] for a, b in zip(starts, starts[1:])]


def test_packing_starts_rows_with_bos_keeps_fitting_documents_whole_and_once(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, size=500)
    cache = write_cache(tmp_path, lengths)
    row_length = 129
    rows = [row for row, _ in prepare.pack_rows(cache, 0, row_length, ((d, 1) for d in range(len(lengths))), 50)]
    seen = {}
    for row in rows:
        assert len(row) == row_length and row[0] == 0  # full rows, no padding, BOS first
        parts = segments(row)
        for index, part in enumerate(parts):
            doc = int(part[0]) - 1 if len(part) else None
            if doc is None:
                continue
            assert (part == doc + 1).all()
            assert doc not in seen, "a document appeared twice"
            seen[doc] = len(part)
            if len(part) < lengths[doc]:  # cropped: only the last piece of a row, and only if it could not fit
                assert index == len(parts) - 1 and lengths[doc] + 1 > row_length - sum(len(p) + 1 for p in parts[:-1])
    fitting = [d for d in range(len(lengths)) if lengths[d] + 1 <= row_length]
    whole = [d for d in fitting if seen.get(d) == lengths[d]]
    assert len(fitting) - len(whole) <= 50  # only what sat in the buffer when the documents ran out


def test_packing_takes_the_largest_document_that_fits(tmp_path):
    cache = write_cache(tmp_path, [10, 50, 30, 100])
    row, _ = next(prepare.pack_rows(cache, 0, 101 + 30, iter([(0, 1), (1, 1), (2, 1), (3, 1)])))
    # 131 slots: the 100 goes first (101 with its BOS); of 30 left only the 10 fits (11);
    # in the last 19 nothing fits, so the shortest remaining (30) is cropped to 18
    assert [len(p) for p in segments(row)] == [100, 10, 18]


def test_dataloader_is_deterministic_per_seed_and_counts_epochs(prepared_module):
    def batches(seed, count):
        loader = prepared_module.make_dataloader(8, "cpu", seed=seed)
        return [next(loader) for _ in range(count)]

    first, again, other = batches(1, 3), batches(1, 3), batches(2, 3)
    for (x1, y1, _), (x2, y2, _) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], other[0][0])
    x, y, epoch = first[0]
    assert x.shape == y.shape == (8, prepared_module.MAX_SEQ_LEN) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and epoch == 1
    bos = prepared_module.Tokenizer.from_prepared().get_bos_token_id()
    assert (x[:, 0] == bos).all()


def test_epoch_advances_after_one_pass(tmp_path):
    lengths = np.full(40, 20)
    cache = write_cache(tmp_path, lengths)
    epochs = [epoch for _, epoch in zip(range(30), (e for _, e in prepare.pack_rows(
        cache, 0, 64, prepare.shuffled_documents(len(lengths), seed=3), buffer_size=5)))]
    assert epochs == sorted(epochs) and epochs[0] == 1 and epochs[-1] >= 2
    # 40 documents of 21 tokens fill about 13 rows of 64: epoch 2 starts near there
    assert 8 <= epochs.index(2) <= 16


# ---------------------------------------------------------------------------
# evaluate_bpb
# ---------------------------------------------------------------------------

class UniformModel(torch.nn.Module):
    """Equal logits everywhere: exactly ln(V) nats per counted token. Fails above max_batch."""

    def __init__(self, vocab, max_batch=None):
        super().__init__()
        self.vocab, self.max_batch = vocab, max_batch
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        if self.max_batch and idx.size(0) > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return torch.zeros(*idx.shape, self.vocab)


def expected_uniform_bpb(folder, vocab):
    rows = np.load(folder / "eval" / "val_rows.npy")
    weights = np.load(folder / "token_bytes.npy")[rows[:, 1:]]
    return (weights > 0).sum() * math.log(vocab) / (math.log(2) * weights.sum())


def test_uniform_model_scores_exactly_ln_vocab_per_counted_token(prepared_module):
    vocab = prepared_module.VOCAB_SIZE
    bpb = prepared_module.evaluate_bpb(UniformModel(vocab), batch_size=4)
    assert bpb == pytest.approx(expected_uniform_bpb(prepared_module.require_prepared_dir(), vocab), rel=1e-6)  # float32 cross-entropy


def test_out_of_memory_in_eval_retries_with_a_smaller_batch(prepared_module, capsys):
    vocab = prepared_module.VOCAB_SIZE
    bpb = prepared_module.evaluate_bpb(UniformModel(vocab, max_batch=2), batch_size=16)
    assert bpb == pytest.approx(expected_uniform_bpb(prepared_module.require_prepared_dir(), vocab), rel=1e-6)  # float32 cross-entropy
    assert "retrying with batch size 2" in capsys.readouterr().err


# Eight training steps of a cpu-profile-sized head (logits of 32 x 256 rows x 4096 tokens, 134 MB, and
# their gradient), in a fresh process that imports prepare before torch, as train.py does, or not.
# Prints how many pages steps 3 to 8 faulted in, in 134 MB blocks.
STEP_FAULTS = """
import resource, sys
if sys.argv[1] == "prepare":
    sys.path.insert(0, sys.argv[2])
    import prepare
import torch
torch.manual_seed(0)
head = torch.nn.Linear(64, 4096, bias=False)
inputs, targets = torch.randn(32 * 256, 64), torch.randint(0, 4096, (32 * 256,))
for step in range(8):
    if step == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(head(inputs), targets).backward()
    head.weight.grad = None
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (32 * 256 * 4096 * 4 / 4096))
"""


def step_faults(imports):
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, imports, str(ROOT)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


def test_a_training_step_reuses_the_memory_the_last_one_freed_once_prepare_is_imported():
    # glibc's default hands every freed block over 32 MB back to the kernel: 4 blocks a step fault
    # in again (24 over the 6 steps, every time). With prepare imported first, measured: 4 to 7.
    default, kept = step_faults("torch"), step_faults("prepare")
    assert default > 18, default
    assert kept < default / 2, (kept, default)


def test_evaluation_reads_exactly_eval_tokens(prepared_module):
    rows = np.load(prepared_module.eval_dir() / "val_rows.npy")
    assert rows.shape == (prepared_module.EVAL_TOKENS // prepared_module.MAX_SEQ_LEN, prepared_module.MAX_SEQ_LEN + 1)


# ---------------------------------------------------------------------------
# Downloads, against a real HTTP server on 127.0.0.1
# ---------------------------------------------------------------------------

def parquet_bytes(documents, path):
    pq.write_table(pa.table({"text": documents}), path)
    return path.read_bytes()


class ShardServer:
    """Serves shards from memory; `plan[name]` lists what each successive GET gets:
    "ok", "500", "truncate" or "corrupt" (the last entry repeats)."""

    def __init__(self, shards, plan=None):
        self.shards, self.plan, self.requests = shards, plan or {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(next(iter(server.shards.values())))))
                self.end_headers()

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                steps = server.plan.get(name, ["ok"])
                step = steps[min(server.requests.count(name) - 1, len(steps) - 1)]
                body = server.shards.get(name)
                if body is None:
                    self.send_error(404)
                    return
                if step == "500":
                    self.send_error(500)
                    return
                if step == "truncate":
                    body = body[: len(body) // 2]
                if step == "corrupt":
                    body = body[:100] + bytes(len(body) - 200) + body[-100:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/data"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    names = [prepare.shard_name(i) for i in (0, 1, prepare.CLIMBMIX_TEST_SHARD, prepare.CLIMBMIX_LAST_SHARD)]
    return {name: parquet_bytes(synthetic_documents(1200, seed), folder / name) for seed, name in enumerate(names)}


def download(cache, server, *extra):
    return run_prepare(cache, "--base-url", server.url, "--num-shards", "2", "--workers", "4",
                       "--retries", "3", "--backoff", "0.01", *SMALL, *extra)


def leftovers(cache):
    return sorted(p.name for p in cache.rglob("*") if ".tmp-" in p.name)


def test_download_prepares_climbmix_then_skips_good_shards(tmp_path, shard_files):
    server = ShardServer(shard_files)
    try:
        result = download(tmp_path, server)
        assert result.returncode == 0, result.stderr
        assert sorted(server.requests) == sorted(shard_files)
        manifest = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
        assert manifest["dataset"] == "climbmix" and manifest["source"]["train_shards"] == 2
        server.requests.clear()
        again = download(tmp_path, server)
        assert again.returncode == 0, again.stderr
        assert server.requests == []  # every shard present and valid: nothing fetched
    finally:
        server.close()


def test_transient_500_and_corrupt_downloads_are_retried(tmp_path, shard_files):
    plan = {"shard_00001.parquet": ["500", "ok"], "shard_00000.parquet": ["truncate", "corrupt", "ok"]}
    server = ShardServer(shard_files, plan)
    try:
        result = download(tmp_path, server)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert server.requests.count("shard_00001.parquet") == 2
    assert server.requests.count("shard_00000.parquet") == 3
    stored = tmp_path / "downloads" / "climbmix" / "shard_00000.parquet"
    assert stored.read_bytes() == shard_files["shard_00000.parquet"]
    assert leftovers(tmp_path) == []


def test_permanent_failure_exits_non_zero_naming_the_shard(tmp_path, shard_files):
    server = ShardServer(shard_files, {"shard_00001.parquet": ["500"]})
    try:
        result = download(tmp_path, server)
    finally:
        server.close()
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "shard_00001.parquet" in error_lines[0]
    assert server.requests.count("shard_00001.parquet") == 4  # first try and three retries
    assert not (tmp_path / "prepared").exists() and leftovers(tmp_path) == []


def test_a_token_budget_on_a_gpu_profile_is_refused_in_one_line(tmp_path):
    for args, words in ((["--profile", "h100", "--train-tokens", "1000"], "h100 trains for its time budget"),
                        (["--profile", "cpu", "--train-tokens", "0"], "at least 1")):
        result = run_prepare(tmp_path, "--dataset", "builtin", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and words in lines[0], result.stderr
        assert not (tmp_path / "prepared").exists()


def test_unreachable_hub_says_how_to_work_offline(tmp_path):
    result = run_prepare(tmp_path, "--base-url", "http://127.0.0.1:9/none", "--retries", "0", *SMALL)
    assert result.returncode != 0
    assert "--dataset builtin" in result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------
# local: sources and bad input
# ---------------------------------------------------------------------------

def write_local(folder, kind, documents):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        pq.write_table(pa.table({"text": documents}), folder / "part.parquet")
    elif kind == "jsonl":
        (folder / "part.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    else:
        for index in range(0, len(documents), 100):
            suffix = ".md" if index % 200 else ".txt"
            (folder / f"file{index}{suffix}").write_text("\n\n".join(documents[index:index + 100]))


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "text"])
def test_local_folder_of_each_format_prepares(tmp_path, kind):
    documents = synthetic_documents(2500, seed=7)
    write_local(tmp_path / "corpus", kind, documents)
    result = run_prepare(tmp_path / "cache", "--dataset", f"local:{tmp_path / 'corpus'}", *SMALL)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "cache" / "prepared" / "prepared.json").read_text())
    assert manifest["dataset"] == f"local:{tmp_path / 'corpus'}"
    if kind != "text":  # text files are cut at blank lines into one document per paragraph here
        assert sum(manifest["documents"].values()) == len(documents)
    assert min(manifest["documents"].values()) > 0


def single_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def test_bad_input_gives_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    bad_jsonl = tmp_path / "bad"
    bad_jsonl.mkdir()
    (bad_jsonl / "x.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert "unknown dataset" in single_error_line(run_prepare(tmp_path / "c1", "--dataset", "wikipedia"))
    assert "no .parquet" in single_error_line(run_prepare(tmp_path / "c2", "--dataset", f"local:{tmp_path / 'empty'}"))
    assert "does not exist" in single_error_line(run_prepare(tmp_path / "c3", "--dataset", f"local:{tmp_path / 'nope'}"))
    assert "x.jsonl:2" in single_error_line(run_prepare(tmp_path / "c4", "--dataset", f"local:{bad_jsonl}"))
    for cache in ("c1", "c2", "c3", "c4"):
        assert not (tmp_path / cache / "prepared").exists()


def test_interrupted_prepare_leaves_nothing_half_written(tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path))
    process = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--dataset", "builtin", "--profile", "cpu"],
                               env=env, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # interrupt it in the middle of building the caches
        if "tokenizer trained" in line:
            break
    assert leftovers(tmp_path), "the build folder should exist while preparing"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert leftovers(tmp_path) == [] and not (tmp_path / "prepared").exists()


# ---------------------------------------------------------------------------
# Profiles as train.py sees them
# ---------------------------------------------------------------------------

def test_h100_profile_matches_upstream():
    assert prepare.PROFILES["h100"] == dict(max_seq_len=2048, time_budget=300, eval_tokens=40 * 524288, vocab_size=8192)
    for constants in prepare.PROFILES.values():
        assert constants["eval_tokens"] % constants["max_seq_len"] == 0


def run_train(cache, **env):
    return subprocess.run([sys.executable, str(ROOT / "train.py")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, AUTORESEARCH_CACHE=str(cache), **env), cwd=ROOT)


def test_train_without_prepared_data_says_which_command_to_run(tmp_path):
    line = single_error_line(run_train(tmp_path))
    assert "no prepared data" in line and "uv run prepare.py" in line


def test_train_refuses_data_prepared_for_another_profile(builtin_cache):
    line = single_error_line(run_train(builtin_cache, AUTORESEARCH_PROFILE="h100"))
    assert "prepared with profile cpu" in line and "uv run prepare.py --profile h100" in line


def test_the_helpers_find_the_cache_where_prepare_writes_it(monkeypatch, tmp_path):
    # scripts/common.py restates these paths so that the helpers never pay for importing torch
    sys.path.insert(0, str(ROOT / "scripts"))
    import common
    for value in (str(tmp_path), ""):
        monkeypatch.setenv("AUTORESEARCH_CACHE", value)
        assert common.cache_dir() == prepare.cache_dir()
        assert common.manifest_path() == prepare.manifest_path()
    assert common.DEFAULT_SEED == prepare.DEFAULT_SEED
    assert common.CPU_PROFILES == prepare.CPU_PROFILES == tuple(name for name in prepare.PROFILES if "cpu" in name)


# ---------------------------------------------------------------------------
# The cache layout: what training reads, and the evaluation data apart from it
# ---------------------------------------------------------------------------

TRAINING_FILES = ["prepared.json", "token_bytes.npy", "tokenizer.json", "train_offsets.npy", "train_tokens.bin"]
EVAL_FILES = ["test_offsets.npy", "test_rows.npy", "test_tokens.bin", "val_offsets.npy", "val_rows.npy",
              "val_tokens.bin"]


def training_view(cache, tmp_path):
    """A cache holding only what training may read, as the helpers' sandbox shows it."""
    view = tmp_path / "training-view"
    (view / "prepared").mkdir(parents=True)
    for name in TRAINING_FILES:
        (view / "prepared" / name).symlink_to(cache / "prepared" / name)
    return view


def test_evaluation_data_lives_apart_from_what_training_reads(builtin_cache, tmp_path):
    prepared = builtin_cache / "prepared"
    assert sorted(p.name for p in prepared.iterdir()) == sorted(TRAINING_FILES + ["eval"])
    assert sorted(p.name for p in (prepared / "eval").iterdir()) == EVAL_FILES
    probe = ("import prepare; loader = prepare.make_dataloader(2); inputs, targets, epoch = next(loader); "
             "print(prepare.evaluation_available(), tuple(inputs.shape))")
    for cache, expected in ((builtin_cache, "True (2, 256)"), (training_view(builtin_cache, tmp_path), "False (2, 256)")):
        result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, AUTORESEARCH_CACHE=str(cache)))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_data_in_the_old_layout_is_refused_with_the_command_to_run(builtin_cache, tmp_path):
    old = tmp_path / "old" / "prepared"
    old.mkdir(parents=True)
    manifest = json.loads((builtin_cache / "prepared" / "prepared.json").read_text())
    del manifest["layout"]
    (old / "prepared.json").write_text(json.dumps(manifest))
    line = single_error_line(run_train(old.parent))
    assert "old layout" in line and "uv run prepare.py --dataset builtin" in line
