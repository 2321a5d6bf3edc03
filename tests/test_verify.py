"""One verification path for every command that reads shards (`shards.open_shards`): sizes and
shapes always, sha256 unless --no_verify (then a one-line warning); a damaged model directory or
checkpoint is one line naming the file, not a traceback."""

import json
import shutil
from pathlib import Path

import pytest

from eva_repro import cli
from eva_repro.data import shards
from eva_repro.model import build_model, model_config

DIMS = dict(grid=2, clip_dim=16, eva_dim=24, seed=0, shard_size=20)
PLAIN_DIT = f"{Path(__file__).resolve().parents[1] / 'examples' / 'plain_dit.py'}:build"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path, synth_shards):
    """A private copy (the tests damage it) of 40 synthetic samples in 2 shards."""
    shutil.copytree(synth_shards(40, **DIMS), tmp_path / "data")
    return tmp_path / "data"


def _argv(command, model, data, out):
    if command == "evaluate":
        return ["evaluate", "--model_path", str(model), "--embeddings_dir", str(data),
                "--output_dir", str(out), "--steps", "2", "--method", "euler", "--sweep", "none",
                "--control_samples", "0", "--num_samples", "4", "--baseline_samples", "16",
                "--quiet", "--no_plots", "--device", "cpu"]
    if command == "sample":
        return ["sample", "--model_path", str(model), "--input_dir", str(data), "--output_dir",
                str(out), "--steps", "2", "--method", "euler", "--device", "cpu", "--no_progress"]
    return ["train", "--data_dir", str(data), "--output_dir", str(out), "--model_size", "tiny",
            "--model_override", "hidden=32", "--model_override", "depth=1", "--model_override",
            "n_heads=4", "--model_override", "n_kv_heads=2", "--max_steps", "1",
            "--batch_size", "8", "--num_workers", "0", "--eval_every", "1000", "--eval_samples",
            "4", "--eval_sampler_steps", "2", "--no_progress", "--no_tensorboard", "--device", "cpu"]


@pytest.mark.parametrize("command", ["evaluate", "sample", "train"])
def test_a_shard_damaged_in_place_stops_every_reader_unless_no_verify(
        command, data, tmp_path, capsys, flip_bytes, tiny_model_dir):
    model, out = tiny_model_dir(16, 24), tmp_path / "out"
    damaged = data / "shard-00001.safetensors"
    size = damaged.stat().st_size
    flip_bytes(damaged, 56)
    assert damaged.stat().st_size == size  # only the checksum can tell
    capsys.readouterr()
    assert cli.main(_argv(command, model, data, out)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {damaged}: sha256 does not match {data / 'manifest.json'}; the file is "
                   "corrupt or was replaced: re-extract it or restore it, or pass --no_verify to "
                   "use it unchecked\n")
    assert not out.exists()  # refused before anything was written
    assert cli.main([*_argv(command, model, data, out), "--no_verify"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--no_verify" in line]
    assert warnings == [f"warning: --no_verify: the sha256 of the 2 shard(s) in {data} was not "
                        "checked (sizes and shapes were)"]


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_a_truncated_shard_is_refused_even_with_no_verify(command, data, tmp_path, capsys,
                                                          tiny_model_dir):
    """Sizes are checked always: a short copy fails before any row is read."""
    damaged = data / "shard-00000.safetensors"
    full = damaged.read_bytes()
    damaged.write_bytes(full[:-100])
    capsys.readouterr()
    argv = [*_argv(command, tiny_model_dir(16, 24), data, tmp_path / "out"), "--no_verify"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: {damaged}: {len(full) - 100} bytes but its header describes "
                       f"{len(full)}; the file is truncated or was damaged: re-extract it or "
                       "restore it")


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.write_text('{"architecture": "eva-repro-dit", "target_dim": 24,')  # cut off mid-write


MODEL_FIX = ("the model directory is damaged: copy it again, or export it again from its run "
             "(save_pretrained)")
CHECKPOINT_FIX = "the checkpoint is damaged: use an older one (or the run's exported model/)"


@pytest.mark.parametrize("where,file,how,message", [
    ("model", "model.safetensors", "truncated", "unreadable safetensors file (Error while "
     f"deserializing header: incomplete metadata, file not fully covered); {MODEL_FIX}"),
    ("model", "config.json", "broken", "not valid JSON (Expecting property name enclosed in double "
     f"quotes: line 1 column 52 (char 51)); {MODEL_FIX}"),
    ("plugin", "model.safetensors", "truncated", "unreadable safetensors file (Error while "
     f"deserializing header: incomplete metadata, file not fully covered); {MODEL_FIX}"),
    ("checkpoint", "ema.safetensors", "truncated", "unreadable safetensors file (Error while "
     f"deserializing header: incomplete metadata, file not fully covered); {CHECKPOINT_FIX}"),
    ("checkpoint", "config.json", "broken", "not valid JSON (Expecting property name enclosed in "
     f"double quotes: line 1 column 52 (char 51)); {CHECKPOINT_FIX}"),
])
def test_a_damaged_model_file_is_one_line_naming_it(where, file, how, message, data, tmp_path,
                                                     capsys, tiny_model_dir):
    model = tmp_path / where
    if where == "model":
        shutil.copytree(tiny_model_dir(16, 24), model)
    elif where == "plugin":  # your own DiT (model/plugin.py), saved the same way
        build_model(model_config(PLAIN_DIT, "tiny", target_dim=24, cond_dim=16, tokens=4, hidden=32,
                                 depth=1, n_heads=2)).save_pretrained(model)
    else:  # a checkpoint directory: what `train` writes every --save_every steps
        run = tmp_path / "run"
        assert cli.main(_argv("train", None, data, run)) == 0
        shutil.copytree(run / "checkpoints" / "step-00000001", model)
        assert json.loads((model / "COMPLETE").read_text())["step"] == 1
    _damage(model / file, how)
    for command in ("sample", "evaluate"):
        capsys.readouterr()
        assert cli.main(_argv(command, model, data, tmp_path / f"out-{command}")) == 2
        assert capsys.readouterr().err == f"error: {model / file}: {message}\n"


def test_open_shards_checks_a_header_that_disagrees_with_the_data(tmp_path, synth_shards,
                                                                  one_line_error):
    """A header whose byte range does not fit its shape is refused by name (an edited header)."""
    root = tmp_path / "data"
    shutil.copytree(synth_shards(40, **DIMS), root)
    path = root / "shard-00000.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["clip"]["shape"] = [20, 4, 8]  # half the bytes its offsets span; same header length
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["clip_dim"] = 8
    (root / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(lambda: shards.open_shards(root, verify=False, warn=False),
                   r"clip spans 2560 bytes but shape \[20, 4, 8\] needs 1280; the header is "
                   "damaged: re-extract it")
