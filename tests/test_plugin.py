"""Bring your own DiT (`model/plugin.py`): an import path trains, resumes, evaluates, samples and
runs under torchrun DDP / FSDP2; a broken factory is a one-line error naming the path."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eva_repro import cli
from eva_repro.evaluation.evaluate import evaluate
from eva_repro.flow import transport
from eva_repro.model import build_model, from_pretrained, model_config
from eva_repro.model import checkpoint as ckpt
from eva_repro.model.plugin import PluginError, PluginModel
from eva_repro.training import train as train_mod

ROOT = Path(__file__).resolve().parents[1]
PLAIN_DIT = f"{ROOT / 'examples' / 'plain_dit.py'}:build"
SMALL = {"hidden": 32, "depth": 2, "n_heads": 2}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(synth_shards):
    return synth_shards(96, grid=2, clip_dim=16, eva_dim=24, seed=0, shard_size=32)


def _options(data_dir, out, **kw):
    return {**dict(data_dir=str(data_dir), output_dir=str(out), backbone=PLAIN_DIT,
                   model_size="tiny", model_overrides=dict(SMALL), batch_size=8, max_steps=4,
                   eval_every=1000, eval_samples=8, eval_sampler_steps=2, num_workers=0,
                   progress=False, tensorboard=False, seed=0), **kw}


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:build"


def test_an_import_path_trains_resumes_evaluates_and_samples(tmp_path, data, capsys):
    run = tmp_path / "run"
    train_mod.train(_options(data, run, save_every=2))
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architecture"] == "eva-repro-plugin" and config["backbone"] == PLAIN_DIT
    assert config["hints"] == {**SMALL, "n_kv_heads": 2} and config["tokens"] == 4
    # resume from the step-2 checkpoint continues the exact trajectory
    again = tmp_path / "again"
    train_mod.train(_options(data, again, max_steps=2, save_every=2))
    resumed = train_mod.train(_options(data, again, max_steps=4, resume="auto"))
    assert resumed["resumed_from"].endswith("step-00000002")
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(d)).model for d in (run, again))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    loaded = ckpt.load_model(run)
    assert isinstance(loaded.model, PluginModel) and type(loaded.model.net).__name__ == "PlainDiT"
    report = evaluate(run, data, steps=2, sweep="none", progress=False, plots=False)
    assert report["model"]["config"]["backbone"] == PLAIN_DIT
    assert cli.main(["sample", "--model_path", str(run), "--input_dir", str(data), "--output_dir",
                     str(tmp_path / "samples"), "--steps", "2", "--no_progress"]) == 0
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert sum(s["num_samples"] for s in manifest["shards"]) == 96


def test_torchrun_ddp_and_fsdp2_rebuild_the_plugin_on_every_rank(tmp_path, data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for extra in ([], ["--fsdp"]):
        out = tmp_path / ("fsdp" if extra else "ddp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "eva_repro", "train", "--data_dir", str(data), "--output_dir",
               str(out), "--backbone", PLAIN_DIT, "--model_size", "tiny", "--batch_size", "4",
               "--max_steps", "2", "--eval_samples", "4", "--eval_sampler_steps", "2",
               "--num_workers", "0", "--no_progress", "--no_tensorboard", "--device", "cpu",
               *[f"--model_override={k}={v}" for k, v in SMALL.items()], *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    single = tmp_path / "single"
    train_mod.train(_options(data, single, max_steps=2, batch_size=8, learning_rate=3e-3))
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(d)).model for d in (single, tmp_path / "ddp"))
    for k in a:  # the same global batch on 1 or 2 ranks: the same weights
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0)


def test_declared_x_prediction_is_mapped_to_the_velocity_once(tmp_path):
    spec = _write(tmp_path, """
        import torch
        class Net(torch.nn.Module):
            prediction = "x"
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(()))
            def forward(self, x, t, cond):
                return self.w * cond[..., :x.shape[-1]]
        def build(target_dim, cond_dim, tokens, **ignored):
            return Net()
    """)
    model = build_model(model_config(spec, "tiny", target_dim=4, cond_dim=6, tokens=4))
    x, t, c = torch.randn(2, 4, 4), torch.tensor([0.25, 0.5]), torch.randn(2, 4, 6)
    torch.testing.assert_close(transport.velocity(model, x, t, c),
                               transport.velocity_from_data(c[..., :4], x, t))
    # no drop_cond argument: a dropped row's condition is zeros
    out = transport.velocity(model, x, t, c, drop_cond=torch.tensor([True, False]))
    torch.testing.assert_close(out[0], transport.velocity_from_data(torch.zeros(4, 4), x[:1], t[:1])[0])
    assert model.config.prediction == "x"
    model.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(from_pretrained(tmp_path / "saved")(x, t, c), model(x, t, c))


@pytest.mark.parametrize("body, match", [
    ("raise ImportError('no such thing')", r"cannot import .*net\.py: ImportError: no such thing"),
    ("build = 3", r"has no callable 'build'"),
    ("def build(**kw):\n    raise RuntimeError('bad width')", r"the factory raised RuntimeError: bad width"),
    ("def build(**kw):\n    return 'not a module'", r"returned str, not a torch.nn.Module"),
    ("import torch\ndef build(**kw):\n    return torch.nn.Linear(2, 2)",
     r"Linear.forward must take \(x_t, t, cond\[, drop_cond\]\)"),
    ("import torch\nclass N(torch.nn.Linear):\n    def forward(self, x, t, c):\n        return x[:, :1]\n"
     "def build(**kw):\n    return N(2, 2)", r"forward returned \(1, 1, 4\) .* must return the same shape"),
])
def test_a_broken_factory_is_one_line_naming_the_import_path(tmp_path, body, match, one_line_error):
    spec = _write(tmp_path, body)

    def use():
        model = build_model(model_config(spec, "tiny", target_dim=4, cond_dim=4, tokens=4))
        model(torch.randn(1, 4, 4), torch.rand(1), torch.randn(1, 4, 4))

    assert spec in one_line_error(use, match, PluginError)


def test_a_missing_module_or_file_is_one_line_at_the_cli(tmp_path, data, capsys):
    for spec in ("no_such_package.net:build", f"{tmp_path / 'absent.py'}:build"):
        code = cli.main(["train", "--data_dir", str(data), "--output_dir", str(tmp_path / "r"),
                         "--backbone", spec, "--max_steps", "1", "--num_workers", "0"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and spec in err and "\n" not in err, err


def test_a_moved_plugin_file_is_named_with_backbone_on_evaluate_and_sample(tmp_path, data, capsys):
    moved = tmp_path / "src" / "plain_dit.py"
    moved.parent.mkdir()
    moved.write_text((ROOT / "examples" / "plain_dit.py").read_text())
    run = tmp_path / "run"
    train_mod.train({**_options(data, run, max_steps=1), "backbone": f"{moved}:build"})
    moved.rename(tmp_path / "plain_dit.py")
    capsys.readouterr()
    args = ["evaluate", "--model_path", str(run), "--embeddings_dir", str(data), "--output_dir",
            str(tmp_path / "report"), "--steps", "1", "--sweep", "none", "--no_plots", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{moved}:build" in err and "no file" in err and "moved?" in err and "\n" not in err
    assert cli.main([*args, "--backbone", f"{tmp_path / 'plain_dit.py'}:build"]) == 0
    assert cli.main(["sample", "--model_path", str(run), "--input_dir", str(data), "--output_dir",
                     str(tmp_path / "out"), "--steps", "1", "--no_progress", "--backbone",
                     f"{tmp_path / 'plain_dit.py'}:build"]) == 0
    capsys.readouterr()
    builtin = tmp_path / "builtin"
    train_mod.train({**_options(data, builtin, max_steps=1), "backbone": "next-dit"})
    assert cli.main(["evaluate", "--model_path", str(builtin), "--embeddings_dir", str(data),
                     "--output_dir", str(tmp_path / "r2"), "--backbone", PLAIN_DIT]) == 2
    assert "--backbone rebuilds a plugin model" in capsys.readouterr().err
