"""Bad flags on every command: one `error:` line on stderr, exit 2, and the output directory is
neither created nor changed (no traceback, no lock file left behind, no half-trained run)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva_repro import cli
from eva_repro.synth import write_synthetic_shards
from eva_repro.train import train

TINY = {"hidden": 32, "depth": 1, "n_heads": 2, "n_kv_heads": 1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shards, a one-step model trained on them, and an image: what the commands read."""
    root = tmp_path_factory.mktemp("flag_errors")
    data = root / "shards"
    write_synthetic_shards(data, 40, grid=2, clip_dim=8, eva_dim=8, seed=0)
    run = root / "run"
    train({"data_dir": str(data), "output_dir": str(run), "model_size": "tiny", "max_steps": 1,
           "model_overrides": TINY, "batch_size": 4, "num_workers": 0, "progress": False,
           "tensorboard": False})
    image = root / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(image)
    return {"data": str(data), "run": str(run), "image": str(image)}


def _argv(command: str, inputs: dict, out: Path, flags: list[str]) -> list[str]:
    base = {
        "train": ["--data_dir", inputs["data"], "--model_size", "tiny", "--max_steps", "1",
                  "--num_workers", "0", "--no_tensorboard", "--no_progress"],
        "evaluate": ["--model_path", inputs["run"], "--embeddings_dir", inputs["data"],
                     "--sweep", "none", "--no_plots", "--quiet"],
        "sample": ["--model_path", inputs["run"], "--input_dir", inputs["data"], "--no_progress"],
        "synth": ["--num_samples", "8"],
        "extract": [inputs["image"], "--eva", "EVA02-B-16", "--clip", "ViT-B-16", "--eva_weights",
                    "random", "--clip_weights", "random", "--encoder_depth", "1", "--grid", "2",
                    "--num_workers", "0", "--no_progress"],
    }[command]
    return [command, *base, "--output_dir", str(out), *flags]


CASES = [  # command, flags, the one line's text
    ("train", ["--grad_clip", "-1"], "--grad_clip must be > 0, got -1.0"),
    ("train", ["--grad_clip", "0"], "--grad_clip must be > 0, got 0.0"),
    ("train", ["--min_lr_ratio", "-1"], "--min_lr_ratio must be in [0, 1], got -1.0"),
    ("train", ["--min_lr_ratio", "1.5"], "--min_lr_ratio must be in [0, 1], got 1.5"),
    ("train", ["--learning_rate", "inf"], "--learning_rate must be finite and > 0, got inf"),
    ("train", ["--learning_rate", "nan"], "--learning_rate must be finite and > 0, got nan"),
    ("train", ["--weight_decay", "-0.1"], "--weight_decay must be finite and >= 0, got -0.1"),
    ("train", ["--cfg_dropout", "1.5"], "--cfg_dropout must be in [0, 1], got 1.5"),
    ("train", ["--cfg_dropout", "-0.1"], "--cfg_dropout must be in [0, 1], got -0.1"),
    ("train", ["--ema_decay", "nan"], "--ema_decay must be in [0, 1), got nan"),
    ("train", ["--ema_decay", "inf"], "--ema_decay must be in [0, 1), got inf"),
    ("evaluate", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("evaluate", ["--retrieval_pool", "0"], "--retrieval_pool must be >= 1, got 0"),
    ("evaluate", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("sample", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("sample", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("synth", ["--grid", "0"], "--grid must be >= 1, got 0"),
    ("synth", ["--shard_size", "0"], "--shard_size must be >= 1, got 0"),
    ("extract", ["--num_workers", "-1"], "--num_workers must be >= 0, got -1"),
    ("extract", ["--limit", "-1"], "--limit must be >= 1 (the first N inputs), got -1"),
    ("extract", ["--limit", "0"], "--limit must be >= 1 (the first N inputs), got 0"),
]


@pytest.mark.parametrize(("command", "flags", "message"), CASES,
                         ids=[f"{c}{''.join(f)}" for c, f, _ in CASES])
def test_a_bad_flag_is_one_line_exit_2_and_creates_nothing(inputs, tmp_path, capsys, command,
                                                           flags, message):
    out = tmp_path / "out"
    code = cli.main(_argv(command, inputs, out, flags))
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {message}\n")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "sample", "synth", "extract"])
def test_an_output_dir_that_is_a_file_is_one_line_exit_2(inputs, tmp_path, capsys, command):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    code = cli.main(_argv(command, inputs, out, []))
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {out}: is a file, not a directory; choose another "
                              "--output_dir\n")
    assert out.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [out]
