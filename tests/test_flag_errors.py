"""Bad flags on every command: one `error:` line on stderr, exit 2, and the output directory is
neither created nor changed (no traceback, no lock file left behind, no half-trained run).

The table is derived from the real parsers: every int / float flag of every subcommand is given
0, -1, nan and inf (floats only; an int flag refuses those as a wrong type) and a wrong type
("abc"). The values a flag legitimately takes are listed in VALID (and not run: they would do
real work); every other case must fail before any model is built or any directory is made.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva_repro import cli
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.training.train import train

TINY = {"hidden": 32, "depth": 1, "n_heads": 2, "n_kv_heads": 1}
COMMANDS = ["extract", "synth", "train", "evaluate", "sample", "check", "zoo", "demo"]  # + bench
WRONG_TYPE = "abc"

# (command, flag, value) that are valid settings, not mistakes: not expected to fail, not run.
VALID = {
    # a seed of 0 is the default seed (negative seeds are refused everywhere)
    *{(c, "--seed", "0") for c in ("extract", "synth", "train", "evaluate", "sample", "check")},
    ("extract", "--num_workers", "0"),  # decode in the main process
    ("train", "--num_workers", "0"),  # load batches in the main process
    ("train", "--warmup_steps", "0"),  # no warmup
    ("train", "--weight_decay", "0"),  # no weight decay
    ("train", "--min_lr_ratio", "0"),  # the cosine decays to zero
    ("train", "--adam_beta1", "0"),  # no momentum (torch's AdamW takes 0 <= beta < 1)
    ("train", "--adam_beta2", "0"),  # as torch allows
    ("train", "--ema_decay", "0"),  # the EMA is the raw weights
    ("train", "--cfg_dropout", "0"),  # never drop the condition (no CFG)
    ("train", "--eval_fraction", "0"),  # no held-out split (train on everything)
    ("train", "--overfit_test_size", "0"),  # the default: overfit mode off
    ("train", "--keep_checkpoints", "0"),  # keep every checkpoint
    ("train", "--eval_samples", "0"),  # no sampled held-out evaluations during training
    ("train", "--time_mean", "0"),  # the logit-normal's mean is any finite number
    ("train", "--time_mean", "-1"),
    ("train", "--grad_clip", "inf"),  # no clipping (clip_grad_norm_ with an infinite norm)
    ("evaluate", "--cfg_scale", "0"),  # unconditional sampling
    ("sample", "--cfg_scale", "0"),
    ("evaluate", "--control_samples", "0"),  # no shuffled-condition control
    ("evaluate", "--sweep_samples", "0"),  # the default: the sweep's own size
}


def _subparser(command: str):
    parser = cli.build_parser([command])
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def _numeric_flags(command: str) -> list[tuple[str, type]]:
    return [(a.option_strings[0], a.type) for a in _subparser(command)._actions
            if a.type in (int, float)]


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for command in COMMANDS:
        for flag, kind in _numeric_flags(command):
            values = ["0", "-1", *(["nan", "inf"] if kind is float else []), WRONG_TYPE]
            cases += [(command, flag, v) for v in values if (command, flag, v) not in VALID]
    return cases


CASES = _cases()


def test_the_table_covers_every_numeric_flag_and_the_allow_list_names_real_flags():
    flags = {(c, f) for c in COMMANDS for f, _ in _numeric_flags(c)}
    assert {(c, f) for c, f, _ in CASES} == flags  # no flag is valid at every value
    assert {(c, f) for c, f, _ in VALID} <= flags
    assert len(CASES) >= 200


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
    """A run of `command` that would work (small), then `flags`: the last value of a flag wins."""
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
        "check": ["--backbone", "next-dit", "--budget", "toy", "--device", "cpu"],
        "zoo": ["--mutant", "correct", "--budget", "toy", "--device", "cpu"],
        "demo": ["--quick", "--device", "cpu"],
        "bench": ["--quick", "--suite", "model"],
    }[command]
    return [command, *base, "--output_dir", str(out), *flags]


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize(("command", "flag", "value"), CASES,
                         ids=[f"{c}{f}={v}" for c, f, v in CASES])
def test_a_bad_flag_is_one_line_exit_2_and_creates_nothing(inputs, tmp_path, capsys, command,
                                                           flag, value):
    out = tmp_path / "out"
    code = _main(_argv(command, inputs, out, [flag, value]))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    if value == WRONG_TYPE:
        # A wrong type is refused by argparse itself, before eva-repro sees the flags: its usage
        # (wrapped over several lines) and then one error line. That is the one place the
        # message is argparse's, so only here is more than one line accepted.
        assert lines[0].startswith("usage: eva-repro "), err
        assert re.fullmatch(rf"eva-repro {command}: error: argument {flag}(/\S+)?: invalid "
                            rf"(int|float) value: '{value}'", lines[-1]), err
    else:
        assert len(lines) == 1 and err.endswith("\n"), err
        assert lines[0].startswith("error: ") and flag in lines[0], err
        number = float(value)
        assert (str(value) in lines[0] or str(number) in lines[0]
                or (math.isnan(number) and "nan" in lines[0])), err
    assert list(tmp_path.iterdir()) == []  # no directory, no lock file, no partial output


MESSAGES = [  # the exact line of a few cases
    ("train", ["--grad_clip", "-1"], "--grad_clip must be > 0, got -1.0"),
    ("train", ["--min_lr_ratio", "1.5"], "--min_lr_ratio must be in [0, 1], got 1.5"),
    ("train", ["--learning_rate", "inf"], "--learning_rate must be finite and > 0, got inf"),
    ("train", ["--ema_decay", "nan"], "--ema_decay must be in [0, 1), got nan"),
    ("train", ["--cfg_dropout", "1.5"], "--cfg_dropout must be in [0, 1], got 1.5"),
    ("evaluate", ["--retrieval_pool", "0"], "--retrieval_pool must be >= 1, got 0"),
    ("sample", ["--shift", "nan"], "--shift must be finite and > 0, got nan"),
    ("synth", ["--gain", "inf"], "--gain must be finite and > 0, got inf"),
    ("extract", ["--limit", "0"], "--limit must be >= 1 (the first N inputs), got 0"),
]


@pytest.mark.parametrize(("command", "flags", "message"), MESSAGES,
                         ids=[f"{c}{''.join(f)}" for c, f, _ in MESSAGES])
def test_the_line_names_the_flag_its_range_and_the_value(inputs, tmp_path, capsys, command,
                                                        flags, message):
    out = tmp_path / "out"
    code = _main(_argv(command, inputs, out, flags))
    assert (code, capsys.readouterr().err) == (2, f"error: {message}\n")
    assert not out.exists()


@pytest.mark.parametrize("command", [*COMMANDS, "bench"])
def test_an_output_dir_that_is_a_file_is_one_line_exit_2(inputs, tmp_path, capsys, command):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    code = _main(_argv(command, inputs, out, []))
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {out}: is a file, not a directory; choose another "
                              "--output_dir\n")
    assert out.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [out]
