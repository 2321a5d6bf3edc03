"""devices: the one place that picks the device and its autocast."""

import pytest
import torch

from eva_repro.utils.devices import DeviceError, autocast, device_of, pick_device
from eva_repro.utils.errors import UserError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


@no_cuda
@pytest.mark.parametrize("name", [None, "", "auto", "cpu"])
def test_cpu_when_there_is_no_gpu(name):
    assert pick_device(name) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"], ids=["bare", "indexed"])
def test_asking_for_a_missing_gpu_is_a_one_line_error(name):
    with pytest.raises(DeviceError, match=rf"--device {name} but CUDA is not available; use "
                                          "--device cpu") as e:
        pick_device(name)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_misspelt_device_names_the_flag():
    with pytest.raises(DeviceError, match="--device gpu0: not a device name"):
        pick_device("gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bare_cuda_is_this_ranks_gpu():
    count = torch.cuda.device_count()
    assert pick_device("cuda", local_rank=count + 1) == torch.device("cuda", 1 % count)
    assert pick_device("cuda:0", local_rank=1) == torch.device("cuda", 0)


def test_cpu_runs_full_precision():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cuda"), None):  # dtype None: no autocast on any device
        assert not torch.is_autocast_enabled("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocasts_to_the_dtype():
    a = torch.randn(4, 4, device="cuda")
    with autocast(a.device):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(a.device, torch.float16):
        assert (a @ a).dtype == torch.float16


def test_device_of_a_model():
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
