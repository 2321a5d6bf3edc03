"""The `eva-repro` command line: one-line user errors (exit 2), tracebacks for bugs, exit 75 when
preempted, and a subcommand per pipeline stage."""

import pytest

from eva_repro import cli
from eva_repro.data import synth
from eva_repro.utils.errors import UserError
from eva_repro.utils.preemption import EXIT_PREEMPTED, Preempted


def test_every_stage_is_a_subcommand_and_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in cli.COMMANDS)


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = cli.main(["synth", "--output_dir", str(tmp_path / "s"), "--num_samples", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --num_samples must be >= 1, got 0\n"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(args):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(synth, "run", broken)
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["synth", "--output_dir", str(tmp_path / "s")])


def test_preempted_work_exits_75(tmp_path, monkeypatch, capsys):
    def stopped(args):
        raise Preempted("SIGTERM: saved at step 3")

    monkeypatch.setattr(synth, "run", stopped)
    assert cli.main(["synth", "--output_dir", str(tmp_path / "s")]) == EXIT_PREEMPTED
    assert capsys.readouterr().err == "preempted: SIGTERM: saved at step 3\n"


def test_stage_errors_share_the_one_base_class():
    from eva_repro.data.shards import ShardError
    from eva_repro.model.checkpoint import CheckpointError
    from eva_repro.training.train import TrainingError

    assert all(issubclass(e, UserError) and issubclass(e, ValueError)
               for e in (CheckpointError, ShardError, TrainingError))


def test_a_diverged_run_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, synth_shards):
    import dataclasses

    from eva_repro.training import train

    data = synth_shards(40, grid=2, clip_dim=8, eva_dim=8, seed=0)
    real = train.transport.velocity_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(train.transport, "velocity_loss", poisoned)
    code = cli.main(["train", "--data_dir", str(data), "--output_dir", str(tmp_path / "run"),
                     "--model_size", "tiny", "--model_override", "hidden=32", "--model_override",
                     "depth=1", "--model_override", "n_heads=2", "--model_override", "n_kv_heads=1",
                     "--batch_size", "4", "--max_steps", "5", "--max_nonfinite_steps", "2",
                     "--num_workers", "0", "--no_tensorboard", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "error: 2 non-finite steps in a row, the last at step 2, batch 1 of epoch 0; lower "
        "--learning_rate, check the data, or resume from an earlier checkpoint")
