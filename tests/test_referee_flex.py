"""The FlexAttention path exports for the referee, on the CPU, through the same code the GPU uses.

On CUDA train.py's sliding-window layers use flex_attention, which torch.export can trace but not
save (SerializeError). While exporting, train.use_flex_attention() is false, so the saved model takes
the boolean-mask SDPA path: the same attention. Here the flex path is switched on for the CPU
(flex_attention runs there for inference, unfused), the model is evaluated in-process through it,
exported, saved, loaded and re-scored by the real referee, and the two numbers are compared.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import ROOT

# float32 on the CPU: flex's unfused kernel and SDPA's math kernel differ only in rounding. Measured
# here (2 layers, width 64, seq 256, 16 rows): below 1e-6 bpb; the bound leaves a margin.
FLEX_TOLERANCE_BPB = 1e-5


@pytest.fixture
def modules(builtin_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(builtin_cache))
    for variable in ("AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET"):
        monkeypatch.delenv(variable, raising=False)
    sys.path.insert(0, str(ROOT))
    import prepare
    import train
    prepare = importlib.reload(prepare)
    train = importlib.reload(train)
    # the CUDA rule, on the CPU: flex attention except while exporting
    monkeypatch.setattr(train, "use_flex_attention", lambda device: not torch.compiler.is_exporting())
    yield prepare, train
    importlib.reload(prepare)


def flex_model(prepare, train):
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=prepare.MAX_SEQ_LEN, vocab_size=prepare.VOCAB_SIZE, n_layer=2, n_head=1,
                             n_embd=64, window_pattern="SL")
    model = train.GPT(config)
    model.init_weights()
    for block in model.blocks:  # zero-initialised projections would make attention irrelevant to the score
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    return model.eval().requires_grad_(False)  # flex_attention has no backward on the CPU


def test_the_flex_path_exports_and_rescores_to_the_same_value(modules, builtin_cache, tmp_path, monkeypatch):
    prepare, train = modules
    model = flex_model(prepare, train)
    assert model.windows == [prepare.MAX_SEQ_LEN // 2, prepare.MAX_SEQ_LEN]  # one sliding-window layer
    monkeypatch.setenv("AUTORESEARCH_EXPORT", str(tmp_path / "model.pt2"))
    result = prepare.evaluate_and_save(model, model, 8)
    assert any(flex for (_, _, flex) in model._attention), "the evaluation did not go through flex_attention"
    with zipfile.ZipFile(tmp_path / "model.pt2") as archive:
        (program,) = [archive.read(name).decode() for name in archive.namelist() if name.endswith("models/model.json")]
    assert program.count('"target": "torch.ops.aten.scaled_dot_product_attention.default"') == 2
    assert "flex_attention" not in program
    lone = tmp_path / "referee"
    lone.mkdir()
    shutil.copy(ROOT / "prepare.py", lone)
    scored = subprocess.run([sys.executable, "-I", str(lone / "prepare.py"), "score", str(tmp_path / "model.pt2")],
                            cwd=lone, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "AUTORESEARCH_CACHE": str(builtin_cache), "AUTORESEARCH_EXPORT": ""})
    assert scored.returncode == 0, scored.stderr[-2000:]
    referee_bpb = float(re.search(r"^val_bpb: (\S+)$", scored.stdout, re.MULTILINE).group(1))
    difference = abs(referee_bpb - result["val_bpb"])
    print(f"flex in-process {result['val_bpb']:.8f}, referee (SDPA) {referee_bpb:.6f}, difference {difference:.2e} "
          f"(the referee prints 6 decimals)")
    assert difference < FLEX_TOLERANCE_BPB


def test_saving_the_flex_path_itself_is_what_fails(modules, tmp_path, monkeypatch):
    # without the swap, the export traces flex_attention and torch.export.save refuses it
    prepare, train = modules
    monkeypatch.setattr(train, "use_flex_attention", lambda device: True)
    with pytest.raises(Exception, match="flex_attention"):
        prepare.save_for_referee(flex_model(prepare, train), tmp_path / "model.pt2", batch_size=8)
    assert not (tmp_path / "model.pt2").exists()


def test_flex_and_masked_sdpa_logits_agree(modules):
    prepare, train = modules
    model = flex_model(prepare, train)
    tokens = torch.randint(0, prepare.VOCAB_SIZE, (4, prepare.MAX_SEQ_LEN))
    with torch.no_grad():
        flex = model(tokens)
        exported = torch.export.export(model, (tokens,)).module()(tokens)
    difference = (flex - exported).abs().max().item()
    print(f"largest logit difference, flex vs masked SDPA: {difference:.2e}")
    torch.testing.assert_close(flex, exported, rtol=1e-4, atol=1e-5)
