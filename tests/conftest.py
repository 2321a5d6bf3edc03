"""Fixtures and markers shared by the test modules.

`cuda` tests (tests/test_cuda.py, `make test-gpu`) run where a GPU is and are skipped cleanly
elsewhere, so CI on CPU stays green.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """2 cores shared by several jobs: a second OpenMP thread spin-waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_line_error():
    """`one_line_error(fn, match, kind=UserError) -> message`: fn raises `kind`, a UserError (what
    the CLI prints as one `error:` line), matching `match`, and its message is one line."""
    from eva_repro.utils.errors import UserError

    def check(fn, match: str, kind: type[Exception] = UserError) -> str:
        with pytest.raises(kind, match=match) as info:
            fn()
        message = str(info.value)
        assert isinstance(info.value, UserError) and "\n" not in message, message
        return message

    return check


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """`synth_shards(num_samples, **kw) -> dir`: `synth.write_synthetic_shards` into a fresh
    directory, once per distinct set of arguments in a test session (treat it as read-only)."""
    from eva_repro.data.synth import write_synthetic_shards

    made: dict[tuple, object] = {}

    def make(num_samples: int, **kw):
        key = (num_samples, *sorted(kw.items()))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("synth")
            write_synthetic_shards(made[key], num_samples, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def token_only_data(tmp_path_factory):
    """Shards whose target is a nonlinear function of the condition token at the same place
    alone (grid 4, 32-d condition, 48-d target): a token's neighbours carry nothing more."""
    from eva_repro.data import shards

    out = tmp_path_factory.mktemp("token_only")
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(240, 16, 32, generator=g)
    eva = torch.tanh(clip @ (torch.randn(32, 48, generator=g) / 32**0.5 * 2))
    shards.write_shard(out, 0, clip, eva, [f"tok-{i:04d}" for i in range(240)])
    shards.write_manifest(out, {"grid": 4, "include_cls": False, "training_mode": "patch_only",
                                "dtype": "float16"})
    return out


@pytest.fixture(scope="session")
def flip_bytes():
    """`flip_bytes(path, n=56) -> offset`: invert n bytes in the middle of a file, size unchanged
    (bit rot, a bad copy): only a checksum can tell."""

    def flip(path, n: int = 56) -> int:
        data = bytearray(path.read_bytes())
        start = len(data) // 2 - n // 2
        data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
        path.write_bytes(bytes(data))
        return start

    return flip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(cond_dim, target_dim) -> dir`: a randomly initialised 1-block DiT saved with
    save_pretrained, once per pair of dims (treat it as read-only; copy it to damage it)."""
    from eva_repro.model import DiT, DiTConfig

    made: dict[tuple, object] = {}

    def make(cond_dim: int, target_dim: int):
        if (cond_dim, target_dim) not in made:
            torch.manual_seed(0)
            model = DiT(DiTConfig(target_dim=target_dim, cond_dim=cond_dim, hidden=32, depth=1,
                                  n_heads=4, n_kv_heads=2, target_norm=3.0))
            for p in model.parameters():  # off the zero init: the output depends on the input
                p.data.add_(0.1 * torch.randn_like(p))
            made[cond_dim, target_dim] = tmp_path_factory.mktemp("model")
            model.save_pretrained(made[cond_dim, target_dim])
        return made[cond_dim, target_dim]

    return make


@pytest.fixture
def kill_writing(monkeypatch):
    """`kill_writing(name)`: from now on, the first atomic write of a file called `name` (a
    shard's .safetensors or .json sidecar, a chunk record, manifest.json) dies the way SIGKILL
    would: it leaves its half-written temp file and raises KeyboardInterrupt, so nothing after
    it happens. Arm it once per run; the rerun writes normally."""
    from pathlib import Path

    from eva_repro.data import shards
    from eva_repro.utils import files

    target: list = [None]

    def dying(write):
        def wrapper(*args, **kwargs):
            path = Path(args[1] if write is real_tensors else args[0])
            if path.name == target[0]:
                target[0] = None
                (path.parent / f".{path.name}.killed.tmp").write_bytes(b"half a file")
                raise KeyboardInterrupt(f"killed while writing {path}")
            return write(*args, **kwargs)
        return wrapper

    real_tensors, real_json = files.atomic_save_safetensors, files.atomic_write_json
    monkeypatch.setattr(files, "atomic_write_bytes", dying(files.atomic_write_bytes))
    for module in (files, shards):  # shards imported the names: patch its references too
        monkeypatch.setattr(module, "atomic_save_safetensors", dying(real_tensors))
        monkeypatch.setattr(module, "atomic_write_json", dying(real_json))

    def arm(name: str) -> None:
        target[0] = name

    return arm
