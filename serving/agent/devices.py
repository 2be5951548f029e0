"""What devices this node has: GPUs through NVML, or the CPU on a machine without one."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from swarm_protocol.agent_messages import MAX_DEVICE_PROCESSES, DeviceInfo, DeviceProcess

log = logging.getLogger(__name__)
BACKEND_CHOICES = ("auto", "nvml", "cpu")
_MILLIWATTS_PER_WATT = 1000.0
R = TypeVar("R")


class DeviceBackendError(RuntimeError):
    """The requested device backend cannot run on this machine."""


class DeviceBackend(Protocol):
    """A source of the node's devices, read afresh on every call."""

    name: str

    def devices(self) -> list[DeviceInfo]: ...


def load_pynvml() -> Any:
    """Return the pynvml module (nvidia-ml-py), or raise DeviceBackendError."""
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError as error:
        raise DeviceBackendError(f"nvidia-ml-py is not installed: {error}") from error
    return pynvml


class NvmlBackend:
    """GPUs read through NVML; `nvml` is the pynvml module (or a fake with its functions)."""

    name = "nvml"

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise DeviceBackendError(f"NVML did not initialise: {error}") from error

    def gpu_count(self) -> int:
        """Return how many GPUs NVML sees (0 when it cannot say)."""
        return self._read(self._nvml.nvmlDeviceGetCount, 0, "device count")

    def devices(self) -> list[DeviceInfo]:
        """Return one DeviceInfo per GPU; a field NVML cannot read becomes None (or 0)."""
        result = []
        for index in range(self.gpu_count()):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            except self._nvml.NVMLError as error:
                log.warning("NVML cannot open GPU %d: %s", index, error)
                continue
            result.append(self._device(index, handle))
        return result

    def shutdown(self) -> None:
        """Release NVML."""
        self._read(self._nvml.nvmlShutdown, None, "shutdown")

    def _device(self, index: int, handle: Any) -> DeviceInfo:
        nvml = self._nvml
        memory = self._read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), None, "memory")
        utilization = self._read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), None,
                                 "utilization")
        temperature_c = self._read(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), None,
            "temperature")
        power_mw = self._read(lambda: nvml.nvmlDeviceGetPowerUsage(handle), None, "power")
        return DeviceInfo(
            index=index,
            kind="gpu",
            name=_text(self._read(lambda: nvml.nvmlDeviceGetName(handle), "unknown GPU", "name")),
            uuid=_text(self._read(lambda: nvml.nvmlDeviceGetUUID(handle), f"gpu-{index}", "uuid")),
            memory_total_bytes=int(memory.total) if memory is not None else 0,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            utilization_pct=float(utilization.gpu) if utilization is not None else 0.0,
            temperature_c=float(temperature_c) if temperature_c is not None else None,
            power_w=power_mw / _MILLIWATTS_PER_WATT if power_mw is not None else None,
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> list[DeviceProcess]:
        """Return the compute processes on a GPU with their memory (bytes; None where NVML
        cannot say), largest first, at most MAX_DEVICE_PROCESSES; [] if NVML has no list."""
        nvml = self._nvml
        # v3 where the binding has it (drivers from 510 on); older bindings, older call.
        read = (getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v3", None)
                or getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None))
        if read is None:
            return []
        found: list[Any] = self._read(lambda: read(handle), [], "processes") or []
        processes = [DeviceProcess(pid=int(p.pid), memory_used_bytes=_bytes_or_none(
            getattr(p, "usedGpuMemory", None))) for p in found]
        processes.sort(key=lambda p: -(p.memory_used_bytes or 0))
        return processes[:MAX_DEVICE_PROCESSES]

    def _read(self, call: Callable[[], R], default: R, what: str) -> R:
        # One unsupported or failing field (power on many consumer cards) must not hide the GPU.
        try:
            return call()
        except self._nvml.NVMLError as error:
            log.debug("NVML cannot read %s: %s", what, error)
            return default


def _bytes_or_none(value: Any) -> int | None:
    # pynvml gives None for NVML_VALUE_NOT_AVAILABLE; a raw binding may give the sentinel.
    if value is None or not isinstance(value, int) or not 0 <= value < 2**63 - 1:
        return None
    return value


def attribute_processes(devices: list[DeviceInfo], replica_of_pid: dict[int, int],
                        group_of: Callable[[int], int | None] | None = None
                        ) -> list[DeviceInfo]:
    """Set each GPU process's replica_id: its pid is a replica's, or its process group is
    (a replica runs as a group leader; a worker it forks holds the CUDA context)."""
    group_of = group_of or _process_group
    for device in devices:
        for process in device.processes:
            replica_id = replica_of_pid.get(process.pid)
            if replica_id is None:
                group = group_of(process.pid)
                replica_id = replica_of_pid.get(group) if group is not None else None
            process.replica_id = replica_id
    return devices


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone, or in another pid namespace
        return None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class CpuBackend:
    """The machine's CPU as its one device, read from /proc (Linux)."""

    name = "cpu"

    def __init__(self, proc_root: Path = Path("/proc"), host_name: str | None = None) -> None:
        self._proc_root = proc_root
        self._host_name = host_name or socket.gethostname()
        self._model_name = _cpu_model_name(proc_root)
        self._last_times = _cpu_times(proc_root)

    def devices(self) -> list[DeviceInfo]:
        """Return the CPU with memory and utilisation since the previous call."""
        total_bytes, available_bytes = _memory_bytes(self._proc_root)
        return [DeviceInfo(
            index=0,
            kind="cpu",
            name=self._model_name,
            uuid=f"cpu-{self._host_name}",
            memory_total_bytes=total_bytes,
            memory_used_bytes=max(total_bytes - available_bytes, 0),
            utilization_pct=self._utilization_pct(),
        )]

    def _utilization_pct(self) -> float:
        now_times = _cpu_times(self._proc_root)
        busy, idle = _busy_idle(self._last_times, now_times)
        self._last_times = now_times
        return round(100.0 * busy / (busy + idle), 1) if busy + idle > 0 else 0.0


def _cpu_model_name(proc_root: Path) -> str:
    try:
        for line in (proc_root / "cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError as error:
        log.debug("cannot read cpuinfo: %s", error)
    return f"CPU ({os.cpu_count() or 1} cores)"


def _memory_bytes(proc_root: Path) -> tuple[int, int]:
    """Return (MemTotal, MemAvailable) in bytes from meminfo, (0, 0) when unreadable."""
    values: dict[str, int] = {}
    try:
        for line in (proc_root / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024  # meminfo counts kibibytes
    except OSError as error:
        log.debug("cannot read meminfo: %s", error)
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", total))


def _cpu_times(proc_root: Path) -> list[int]:
    """Return the aggregate jiffies of the first /proc/stat line (empty when unreadable)."""
    try:
        with (proc_root / "stat").open() as stat:
            first = stat.readline().split()
    except OSError as error:
        log.debug("cannot read /proc/stat: %s", error)
        return []
    return [int(part) for part in first[1:] if part.isdigit()] if first[:1] == ["cpu"] else []


def _busy_idle(before: list[int], after: list[int]) -> tuple[int, int]:
    if len(before) < 5 or len(before) != len(after):
        return 0, 0
    deltas = [max(b - a, 0) for a, b in zip(before, after, strict=True)]
    idle = deltas[3] + deltas[4]  # idle + iowait
    # guest and guest_nice (fields 9, 10) are already counted inside user and nice.
    return sum(deltas[:8]) - idle, idle


def detect_backend(choice: str = "auto", nvml: Any = None) -> DeviceBackend:
    """Return the backend for `choice`: auto picks NVML when it starts and sees a GPU."""
    if choice not in BACKEND_CHOICES:
        raise DeviceBackendError(f"device backend must be one of {', '.join(BACKEND_CHOICES)}")
    if choice == "cpu":
        return CpuBackend()
    try:
        backend = NvmlBackend(nvml if nvml is not None else load_pynvml())
    except DeviceBackendError as error:
        if choice == "nvml":
            raise
        log.info("no NVML (%s): reporting the CPU as this node's device", error)
        return CpuBackend()
    if backend.gpu_count() == 0:
        backend.shutdown()
        if choice == "nvml":
            raise DeviceBackendError("NVML started but found no GPU")
        log.info("NVML found no GPU: reporting the CPU as this node's device")
        return CpuBackend()
    return backend

