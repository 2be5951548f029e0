"""GPU memory by process (issue 15): the agent reads NVML's compute processes per GPU
(a fake NVML here: no GPU), ties each to its replica by pid or process group, sends a
bounded list in the heartbeat, and the fleet page shows memory per replica under each GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from serving import services
from serving.agent.devices import NvmlBackend, attribute_processes
from serving.models import Replica
from swarm_protocol.agent_messages import (
    MAX_DEVICE_PROCESSES,
    DeviceInfo,
    DeviceProcess,
    HeartbeatRequest,
    ProtocolError,
    ReplicaStatus,
)
from tests.agent_fakes import FakeGpu, FakeNvml, FakeNVMLError
from tests.dashboards_helpers import gpu
from tests.waiting import wait_until

GIB = 1024**3
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as a raw binding returns it


@dataclass
class NvmlProcess:
    pid: int
    usedGpuMemory: int | None  # NVML's name


class NvmlWithProcesses(FakeNvml):
    """The fake NVML plus the v3 process list (and the older call, which must go unused)."""

    def __init__(self, gpus: list[FakeGpu], processes: dict[int, list[NvmlProcess]],
                 fails: bool = False) -> None:
        super().__init__(gpus)
        self.processes, self.fails = processes, fails

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: FakeGpu) -> list[NvmlProcess]:
        if self.fails:
            raise FakeNVMLError("Not Supported")
        return self.processes.get(self.gpus.index(handle), [])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[NvmlProcess]:
        raise AssertionError("v3 is there: the older call must not be used")


def h100(name: str = "GPU-a") -> FakeGpu:
    return FakeGpu(name="NVIDIA H100", uuid=name, memory_total_bytes=80 * GIB,
                   memory_used_bytes=7 * GIB, utilization_pct=50)


def test_each_gpu_reports_its_processes_largest_first():
    nvml = NvmlWithProcesses([h100(), h100("GPU-b")], {0: [
        NvmlProcess(101, 1 * GIB), NvmlProcess(102, 5 * GIB), NvmlProcess(103, None),
        NvmlProcess(104, NOT_AVAILABLE)]})
    first, second = NvmlBackend(nvml).devices()
    assert first.processes == [DeviceProcess(102, 5 * GIB), DeviceProcess(101, 1 * GIB),
                               DeviceProcess(103, None), DeviceProcess(104, None)]
    assert second.processes == []
    assert DeviceInfo.from_dict(first.to_dict()) == first


def test_the_list_is_bounded_and_a_failing_call_hides_no_gpu():
    many = [NvmlProcess(1000 + i, i) for i in range(MAX_DEVICE_PROCESSES + 40)]
    (device,) = NvmlBackend(NvmlWithProcesses([h100()], {0: many})).devices()
    assert len(device.processes) == MAX_DEVICE_PROCESSES
    assert device.processes[0].memory_used_bytes == MAX_DEVICE_PROCESSES + 39
    (device,) = NvmlBackend(NvmlWithProcesses([h100()], {0: many}, fails=True)).devices()
    assert device.processes == [] and device.memory_used_bytes == 7 * GIB


def test_an_nvml_without_the_process_list_reports_none():
    (device,) = NvmlBackend(FakeNvml([h100()])).devices()
    assert device.processes == []


def test_the_portal_refuses_an_unbounded_or_bad_process_list():
    raw = gpu().to_dict()
    for processes in ([{"pid": 1}] * (MAX_DEVICE_PROCESSES + 1), [{"pid": -1}],
                      [{"pid": 1, "memory_used_bytes": -5}], [{"pid": 1, "replica_id": 0}],
                      [{"memory_used_bytes": 1}], {"pid": 1}):
        with pytest.raises(ProtocolError):
            DeviceInfo.from_dict({**raw, "processes": processes})
    assert DeviceInfo.from_dict(raw).processes == []  # an older agent sends none


def test_processes_are_tied_to_replicas_by_pid_or_process_group():
    # A real replica-like group: a leader (as the agent starts replicas) and a child it forks.
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable,"
         " '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout is not None and leader.stdout.readline() == "up\n"
        children: list[int] = []

        def forked() -> bool:
            out = subprocess.run(["pgrep", "-g", str(leader.pid)], capture_output=True,
                                 text=True).stdout.split()
            children[:] = [int(p) for p in out if int(p) != leader.pid]
            return bool(children)
        wait_until(forked, timeout_s=10, what="the leader's child to start")
        device = gpu()
        device.processes = [DeviceProcess(leader.pid, GIB), DeviceProcess(children[0], 2 * GIB),
                            DeviceProcess(os.getpid(), 3 * GIB)]
        (tied,) = attribute_processes([device], {leader.pid: 42})
        assert [p.replica_id for p in tied.processes] == [42, 42, None]
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


@pytest.mark.django_db
def test_the_fleet_page_shows_memory_per_replica_under_each_gpu(client, viewer,
                                                                served_deployment):
    replica = Replica.objects.get()
    device = gpu()
    device.processes = [DeviceProcess(4242, 3 * GIB, replica.pk), DeviceProcess(777, None)]
    services.do_heartbeat(replica.node, HeartbeatRequest(
        devices=[device], replicas=[ReplicaStatus(replica_id=replica.pk, state="ready",
                                                  port=9100)]))
    client.force_login(viewer)
    html = client.get("/fleet/").content.decode()
    row = html.split('data-gpu-processes="0"')[1].split("</tr>")[0]
    assert f"replica #{replica.pk} · mlp <b>3.0 GiB</b>" in row
    assert "pid 777 (not a replica) <b>memory unknown</b>" in row
