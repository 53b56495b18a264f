"""--device: one parser for every command (metroem.devices)."""

from __future__ import annotations

import pytest
import torch

from metroem import devices
from metroem.errors import MetroemError

N = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_parse_devices():
    assert devices.parse_devices("cpu") == [torch.device("cpu")]
    assert devices.parse_devices(None) == [torch.device("cpu")]
    assert devices.parse_devices(" CPU ") == [torch.device("cpu")]
    assert len(devices.parse_devices("all")) == max(1, N)
    with pytest.raises(MetroemError) as e:
        devices.parse_devices(f"{N},{N + 2}")
    assert "\n" not in str(e.value) and "not available" in str(e.value)
    with pytest.raises(MetroemError, match="unknown --device 'fast'"):
        devices.parse_devices("fast")
    with pytest.raises(MetroemError, match="empty"):
        devices.parse_devices(",")
    if N == 0:
        with pytest.raises(MetroemError, match="no GPU"):
            devices.parse_devices("gpu")
    else:
        assert devices.parse_devices("gpu") == [torch.device("cuda:0")]


@pytest.mark.parametrize("spec", ["cuda:7", "7", "gpu"])
def test_a_missing_gpu_is_an_error_naming_it(spec):
    if N > 7:
        pytest.skip("this machine has 8 GPUs")
    local = 7 if spec == "gpu" else 0  # torchrun's LOCAL_RANK picks the GPU of "gpu"
    with pytest.raises(MetroemError, match=f"'{spec}' asks for GPU 7"):
        devices.parse_device(spec, local_rank=local)


def test_parse_device_is_one_device():
    assert devices.parse_device("cpu") == torch.device("cpu")
    assert devices.parse_device(torch.device("cpu")) == torch.device("cpu")
    if N == 0:
        assert devices.parse_device("all") == torch.device("cpu")  # every GPU, else the CPU
    if N >= 2:
        with pytest.raises(MetroemError, match="names 2 devices"):
            devices.parse_device("0,1")
    else:
        with pytest.raises(MetroemError, match="not available"):
            devices.parse_device("0,1")
