"""The referee's artifact carries no code: crafted .pt2 archives against the real `prepare.py score`.

Each attack is first shown to work against plain `torch.export.load` (the marker file is written),
then shown to be refused by the referee, run as the helpers run it (`python -I` on a lone copy of
prepare.py), with the marker never written. The archives are rebuilt from a real export of a tiny
causal model with torch's own archive writer, so only the attacked part differs.
"""

import importlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402


class TinyCausalModel(torch.nn.Module):
    """Logits from each position's own token: causal, exportable, a few hundred KB."""

    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.embedding(idx))


class CallCounter(TinyCausalModel):
    """Counts its calls in a buffer: state that could tell the probe (the last calls) from evaluation."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, idx):
        self.calls.add_(1)
        return super().forward(idx) + 0 * self.calls


class RunsCode:
    """Unpickling this writes the marker file: what a pickle in an archive can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def prepared(builtin_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(builtin_cache))
    for variable in ("AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET"):
        monkeypatch.delenv(variable, raising=False)
    yield importlib.reload(prepare)
    importlib.reload(prepare)


def export(module, model, path):
    module.save_for_referee(model.eval(), path, batch_size=8)
    return path


def members(path):
    """{name under the archive's top folder: bytes}."""
    with zipfile.ZipFile(path) as archive:
        return {entry.filename.split("/", 1)[1]: archive.read(entry) for entry in archive.infolist()}


def rebuild(source, target, changes):
    """A copy of the archive `source` with members replaced (bytes), added, or removed (None),
    written with torch's own writer, as torch.export.save would."""
    from torch.export.pt2_archive._package import PT2ArchiveWriter
    records = members(source)
    for name in ("byteorder", ".data/version", ".data/serialization_id"):  # the writer adds these itself
        records.pop(name)
    records.update(changes)
    with PT2ArchiveWriter(str(target)) as writer:
        for name, data in records.items():
            if data is not None:
                writer.write_bytes(name, data)
    return target


def referee(model, cache, *options, python_flags=()):
    """`prepare.py score MODEL OPTIONS...` as the helpers run it: `python -I` on a lone copy."""
    lone = model.parent / "referee"
    lone.mkdir(exist_ok=True)
    shutil.copy(ROOT / "prepare.py", lone)
    return subprocess.run([sys.executable, "-I", *python_flags, str(lone / "prepare.py"), "score", str(model), *options],
                          cwd=lone, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, AUTORESEARCH_CACHE=str(cache)))


def plain_torch_load(model):
    """What the referee did before: torch.export.load, then one call of the module. In this process
    (a subprocess would only pay torch's import again): the attacks' payloads write a marker file,
    and whatever the crafted archive makes torch raise afterwards does not matter here."""
    try:
        torch.export.load(str(model)).module()(torch.zeros(2, 256, dtype=torch.int64))
    except Exception:  # noqa: BLE001  (the payload ran, or did not, before any error)
        pass


def assert_refused(result, why):
    assert result.returncode == 4, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("invalid: the saved model is refused") and why in line, line
    assert "val_bpb" not in result.stdout


def test_a_genuine_artifact_scores(prepared, builtin_cache, tmp_path):
    model = TinyCausalModel(prepared.VOCAB_SIZE)
    with torch.no_grad():
        expected = prepared.evaluate_bpb(model, batch_size=8)
    result = referee(export(prepared, model, tmp_path / "model.pt2"), builtin_cache)
    assert result.returncode == 0, result.stderr
    assert float(re.search(r"^val_bpb: (\S+)$", result.stdout, re.MULTILINE).group(1)) == pytest.approx(expected, abs=2e-6)


def test_a_pickled_weight_entry_never_runs(prepared, builtin_cache, tmp_path):
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    marker = tmp_path / "marker"
    config = json.loads(members(genuine)["data/weights/model_weights_config.json"])
    entry = config["config"]["head.weight"]
    entry["use_pickle"] = True
    crafted = rebuild(genuine, tmp_path / "model.pt2", {
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        f"data/weights/{entry['path_name']}": pickle.dumps(RunsCode(marker)),
    })
    plain_torch_load(crafted)
    assert marker.exists(), "the attack does not work against torch.export.load: the test proves nothing"
    marker.unlink()
    assert_refused(referee(crafted, builtin_cache), "pickled (use_pickle)")
    assert not marker.exists()


def test_a_pickled_constant_entry_never_runs(prepared, builtin_cache, tmp_path):
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    marker = tmp_path / "marker"
    config = {"config": {"planted": {"path_name": "tensor_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}}}
    crafted = rebuild(genuine, tmp_path / "model.pt2", {
        "data/constants/model_constants_config.json": json.dumps(config).encode(),
        "data/constants/tensor_0": pickle.dumps(RunsCode(marker)),
    })
    plain_torch_load(crafted)
    assert marker.exists(), "the attack does not work against torch.export.load: the test proves nothing"
    marker.unlink()
    assert_refused(referee(crafted, builtin_cache), "pickled (use_pickle)")
    assert not marker.exists()


def test_pickled_sample_inputs_are_never_unpickled(prepared, builtin_cache, tmp_path):
    # torch.export.load retries the sample inputs with weights_only=False when the safe load fails
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    marker = tmp_path / "marker"
    crafted = rebuild(genuine, tmp_path / "model.pt2",
                      {"data/sample_inputs/model.pt": pickle.dumps(RunsCode(marker))})
    plain_torch_load(crafted)
    assert marker.exists(), "the attack does not work against torch.export.load: the test proves nothing"
    marker.unlink()
    result = referee(crafted, builtin_cache)  # the referee uses its own sample inputs: the model still scores
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_a_shape_expression_that_is_code_never_runs(prepared, builtin_cache, tmp_path):
    # torch parses shape expressions with sympy.sympify, which evaluates Python
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    marker = tmp_path / "marker"
    program = members(genuine)["models/model.json"].decode()
    symbol = re.search(r"Symbol\('(s\d+)', positive=True, integer=True\)", program).group(0)
    payload = f"__import__('builtins').exec(\\\"open('{marker}', 'w').write('ran')\\\") or {symbol}"
    crafted = rebuild(genuine, tmp_path / "model.pt2",
                      {"models/model.json": program.replace(symbol, payload, 1).encode()})
    plain_torch_load(crafted)
    assert marker.exists(), "the attack does not work against torch.export.load: the test proves nothing"
    marker.unlink()
    assert_refused(referee(crafted, builtin_cache), "shape expression")
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torch.os.system", "builtins.exec", "torch.ops.higher_order.flex_attention",
                                    "torch.ops.aten.from_file.default", "#extension"])
def test_a_graph_calling_anything_but_aten_is_refused(prepared, builtin_cache, tmp_path, target):
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    program = members(genuine)["models/model.json"].decode()
    assert '"target": "torch.ops.aten.embedding.default"' in program
    crafted = rebuild(genuine, tmp_path / "model.pt2", {"models/model.json": program.replace(
        '"target": "torch.ops.aten.embedding.default"', f'"target": "{target}"').encode()})
    assert_refused(referee(crafted, builtin_cache), target)


@pytest.mark.parametrize("member", ["data/constants/custom_obj_0", "data/constants/opaque_obj_0", "extra/notes.txt",
                                    "data/weights/model.pt", "data/aotinductor/model/model.so"])
def test_an_unknown_member_is_refused(prepared, builtin_cache, tmp_path, member):
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    crafted = rebuild(genuine, tmp_path / "model.pt2", {member: b"anything"})
    assert_refused(referee(crafted, builtin_cache), f"unknown member {member!r}")


def test_a_refused_archive_is_refused_before_torch_is_imported(prepared, builtin_cache, tmp_path):
    # What torch's own readers might do with a crafted archive (a parser bug, a new unpickling
    # path) cannot happen if torch is never imported: every check runs on the zip first.
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    crafted = rebuild(genuine, tmp_path / "model.pt2", {"extra/notes.txt": b"anything"})
    result = referee(crafted, builtin_cache, python_flags=("-X", "importtime"))
    assert result.returncode == 4, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported and not [name for name in imported if name.split(".")[0] == "torch"]


def test_a_model_that_writes_its_buffers_is_refused(prepared, builtin_cache, tmp_path):
    result = referee(export(prepared, CallCounter(prepared.VOCAB_SIZE), tmp_path / "model.pt2"), builtin_cache)
    assert_refused(result, "mutates its buffers or inputs")


def test_a_broken_file_is_one_line_and_exit_1(prepared, builtin_cache, tmp_path):
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    for name, data in (("text.pt2", b"not a zip at all"), ("truncated.pt2", genuine.read_bytes()[:5000])):
        (tmp_path / name).write_bytes(data)
        result = referee(tmp_path / name, builtin_cache)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("prepare: error: "), result.stderr
    result = referee(tmp_path / "missing.pt2", builtin_cache)
    assert result.returncode == 1 and "no saved model at" in result.stderr


def test_guards_that_are_code_never_run(prepared, builtin_cache, tmp_path):
    # torch compiles an exported program's guards (Python source) into the module it returns
    genuine = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "genuine.pt2")
    marker = tmp_path / "marker"
    program = json.loads(members(genuine)["models/model.json"])
    program["guards_code"] = [f"open('{marker}', 'w').write('ran') > 0"]
    crafted = rebuild(genuine, tmp_path / "model.pt2", {"models/model.json": json.dumps(program).encode()})
    plain_torch_load(crafted)
    assert marker.exists(), "the attack does not work against torch.export.load: the test proves nothing"
    marker.unlink()
    result = referee(crafted, builtin_cache)  # the referee drops the guards: the model still scores
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Parameter golf: the int8+zlib round trip and the artifact's size

class GolfModel(torch.nn.Module):
    """Big enough for int8 rows (the embedding), a float16 tensor (the norm), and a bias table kept
    as a non-persistent buffer: a lifted constant, which must count in the artifact like a weight."""

    def __init__(self, vocab, hidden_bias=0):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(vocab, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, vocab, bias=False)
        self.register_buffer("table", torch.randn(max(hidden_bias, 1), vocab) * 0.01, persistent=False)

    def forward(self, idx):
        return self.head(self.norm(self.embedding(idx))) + self.table[:1]


def golf_referee(model, cache, *extra):
    return referee(model, cache, "--int8-zlib", *extra)


def printed(result, pattern):
    return re.search(pattern, result.stdout, re.MULTILINE).group(1)


def test_golf_scores_the_round_tripped_model_and_counts_code_plus_compressed_model(prepared, builtin_cache, tmp_path):
    import zlib
    model = GolfModel(prepared.VOCAB_SIZE)
    path = export(prepared, model, tmp_path / "model.pt2")
    code = tmp_path / "train.py"
    code.write_bytes(b"print('a training script')\n" * 1000)
    result = golf_referee(path, builtin_cache, "--code", str(code))
    assert result.returncode == 0, result.stderr
    model_bytes = int(printed(result, r"^Serialized model int8\+zlib: (\d+) bytes$"))
    total = int(printed(result, r"^Total submission size int8\+zlib: (\d+) bytes$"))
    assert total == int(printed(result, r"^artifact_bytes: (\d+)$")) == len(code.read_bytes()) + model_bytes
    # The compressed model is exactly zlib level 9 of the payload of every tensor of the program.
    program = torch.export.load(str(path))
    assert model_bytes == len(zlib.compress(prepared.golf_payload(prepared.golf_tensors(program)), 9))
    # The score is the round-tripped model's: close to the float model's, but not the same number.
    with torch.no_grad():
        original = prepared.evaluate_bpb(model.eval(), batch_size=8)
        prepared.golf_round_trip(program)
        expected = prepared.evaluate_bpb(program.module(), batch_size=8)
    bpb = float(printed(result, r"^val_bpb: (\S+)$"))
    assert bpb == pytest.approx(expected, abs=2e-6) and bpb != pytest.approx(original, abs=1e-6)
    assert abs(bpb - original) < 0.01
    assert float(printed(result, r"^final_int8_zlib_roundtrip val_bpb:(\S+)$")) == pytest.approx(bpb, abs=1e-6)


def test_golf_counts_weights_hidden_in_a_non_persistent_buffer(prepared, builtin_cache, tmp_path):
    # The attack: 500 rows of a random table as a non-persistent buffer, which torch.export lifts out
    # of the state dict into the program's constants. Counting only the state dict would miss it.
    plain = golf_referee(export(prepared, GolfModel(prepared.VOCAB_SIZE), tmp_path / "plain.pt2"), builtin_cache)
    hidden = golf_referee(export(prepared, GolfModel(prepared.VOCAB_SIZE, hidden_bias=500), tmp_path / "hidden.pt2"),
                          builtin_cache)
    assert plain.returncode == 0 and hidden.returncode == 0, plain.stderr + hidden.stderr
    extra = int(printed(hidden, r"^artifact_bytes: (\d+)$")) - int(printed(plain, r"^artifact_bytes: (\d+)$"))
    assert extra > 0.8 * 500 * prepared.VOCAB_SIZE  # about a byte per int8 of random values, incompressible


def test_int8_rows_stay_within_half_a_step_of_the_clipped_weights(prepared):
    torch.manual_seed(1)
    weight = torch.randn(300, 400)
    values, scale = prepared.quantize_int8(weight)
    assert values.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (300,)
    restored = values.float() * scale.float()[:, None]
    assert ((restored - weight).abs() <= scale.float()[:, None] / 2 + 1e-6).all()  # no clipping in 400 columns
    # A row of a million: the quantile is its second largest |w|, so one outlier is clipped to it and
    # does not ruin the resolution of the rest of its row.
    wide = torch.randn(2, 1_000_000)
    wide[0, 0] = 1000.0
    values, scale = prepared.quantize_int8(wide)
    second = wide[0].abs().sort().values[-2]
    assert float(values[0, 0]) * float(scale[0]) == pytest.approx(float(second), rel=2e-3)
    assert math.ceil(prepared.INT8_CLIP_QUANTILE * 1_000_000) == 1_000_000 - 1
    tensors = {"big": weight, "small": torch.randn(10, 10), "steps": torch.arange(5)}
    payload = prepared.golf_payload(tensors)
    assert payload == prepared.golf_payload(dict(tensors))  # the same model, the same bytes
    back = prepared.golf_unpack(payload)
    assert torch.equal(back["small"], tensors["small"].half().float())  # small tensors travel as float16
    assert torch.equal(back["steps"], tensors["steps"])
    assert back["big"].shape == weight.shape and (back["big"] - restored).abs().max() == 0


def test_code_is_counted_only_for_a_golf_artifact(prepared, builtin_cache, tmp_path):
    path = export(prepared, TinyCausalModel(prepared.VOCAB_SIZE), tmp_path / "model.pt2")
    result = referee(path, builtin_cache)
    assert "artifact_bytes" not in result.stdout
    result = referee(path, builtin_cache, "--code", "train.py")
    assert result.returncode == 1 and result.stderr.strip() == \
        "prepare: error: --code counts the code of a parameter-golf artifact: give it with --int8-zlib"
