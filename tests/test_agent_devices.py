"""The agent's device backends: NVML (through a fake pynvml) and the CPU fallback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serving.agent.devices import (
    CpuBackend,
    DeviceBackendError,
    NvmlBackend,
    detect_backend,
)
from swarm_protocol.agent_messages import DeviceInfo
from tests.agent_fakes import FakeGpu, FakeNvml

GIB = 1024**3


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaa", memory_total_bytes=80 * GIB,
                memory_used_bytes=3 * GIB, utilization_pct=42, temperature_c=61,
                power_mw=312_500),
        FakeGpu(name=b"NVIDIA GeForce RTX 3060", uuid="GPU-bbb", memory_total_bytes=12 * GIB,
                memory_used_bytes=0, utilization_pct=0, temperature_c=None, power_mw=None),
    ]


def test_nvml_backend_reports_every_gpu_with_units_converted() -> None:
    first, second = NvmlBackend(FakeNvml(two_gpus())).devices()

    assert first == DeviceInfo(index=0, kind="gpu", name="NVIDIA H100 80GB HBM3",
                               uuid="GPU-aaa", memory_total_bytes=80 * GIB,
                               memory_used_bytes=3 * GIB, utilization_pct=42.0,
                               temperature_c=61.0, power_w=312.5)
    assert (second.index, second.name, second.uuid) == (1, "NVIDIA GeForce RTX 3060", "GPU-bbb")
    assert DeviceInfo.from_dict(first.to_dict()) == first


def test_a_gpu_without_power_or_temperature_reading_reports_none() -> None:
    devices = NvmlBackend(FakeNvml(two_gpus())).devices()

    assert devices[1].power_w is None
    assert devices[1].temperature_c is None
    assert devices[1].memory_total_bytes == 12 * GIB  # the other fields are still read
    assert devices[0].power_w == 312.5


def test_nvml_backend_refuses_to_start_when_init_fails() -> None:
    with pytest.raises(DeviceBackendError, match="NVML did not initialise"):
        NvmlBackend(FakeNvml(two_gpus(), init_fails=True))


def test_auto_picks_nvml_when_it_finds_a_gpu() -> None:
    backend = detect_backend("auto", nvml=FakeNvml(two_gpus()))

    assert backend.name == "nvml"
    assert [device.uuid for device in backend.devices()] == ["GPU-aaa", "GPU-bbb"]


def test_auto_falls_back_to_the_cpu_when_nvml_init_fails() -> None:
    backend = detect_backend("auto", nvml=FakeNvml(two_gpus(), init_fails=True))

    assert isinstance(backend, CpuBackend)
    [cpu] = backend.devices()
    assert cpu.kind == "cpu"


def test_auto_falls_back_to_the_cpu_when_nvml_finds_no_gpu() -> None:
    nvml = FakeNvml([])

    backend = detect_backend("auto", nvml=nvml)

    assert isinstance(backend, CpuBackend)
    assert nvml.shutdown_calls == 1


def test_asking_for_nvml_explicitly_fails_loudly_without_it() -> None:
    with pytest.raises(DeviceBackendError):
        detect_backend("nvml", nvml=FakeNvml([], init_fails=True))
    with pytest.raises(DeviceBackendError, match="no GPU"):
        detect_backend("nvml", nvml=FakeNvml([]))


def test_auto_without_the_nvidia_driver_reports_the_cpu() -> None:
    # This machine has nvidia-ml-py installed but no NVIDIA driver.
    assert detect_backend("auto").name == "cpu"


def test_unknown_backend_choice_is_refused() -> None:
    with pytest.raises(DeviceBackendError, match="must be one of"):
        detect_backend("tpu")


def write_proc(root: Path, stat_line: str) -> None:
    root.mkdir(exist_ok=True)
    (root / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Fake Xeon 9000\n")
    (root / "meminfo").write_text("MemTotal:  1000 kB\nMemFree:  100 kB\nMemAvailable:  400 kB\n")
    (root / "stat").write_text(f"{stat_line}\ncpu0 1 2 3 4\n")


def test_cpu_backend_reads_model_memory_and_utilisation_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_proc(proc, "cpu  100 0 100 800 0 0 0 0 0 0")
    backend = CpuBackend(proc_root=proc, host_name="box")
    # 30 busy jiffies (user 20 + system 10) and 70 idle ones since the first reading.
    write_proc(proc, "cpu  120 0 110 870 0 0 0 0 0 0")

    [cpu] = backend.devices()

    assert cpu == DeviceInfo(index=0, kind="cpu", name="Fake Xeon 9000", uuid="cpu-box",
                             memory_total_bytes=1000 * 1024, memory_used_bytes=600 * 1024,
                             utilization_pct=30.0)


def test_cpu_backend_on_this_machine_reports_sane_figures() -> None:
    [cpu] = CpuBackend().devices()

    assert cpu.kind == "cpu" and cpu.name
    assert 0 < cpu.memory_used_bytes < cpu.memory_total_bytes
    assert 0.0 <= cpu.utilization_pct <= 100.0


def test_the_cpu_backend_measures_utilisation_between_heartbeats() -> None:
    backend = CpuBackend()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:  # keep one core busy for a moment
        pass

    [cpu] = backend.devices()

    assert cpu.utilization_pct > 0.0
