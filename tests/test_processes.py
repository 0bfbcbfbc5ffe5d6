"""compressor.processes: a live run is never taken for dead when the wall clock is stepped (the CI machines step it:
a test's `compressor run` was SIGKILLed by a Ray watchdog that took its owner, the pytest process, for dead)."""

import os
import subprocess
import time

import psutil
import pytest

from compressor import processes, ray_runtime
from compressor.locks import Owner


def test_a_process_is_itself_until_it_exits_and_a_zombie_or_a_gone_pid_is_not():
    me = processes.started(os.getpid())
    assert me is not None and processes.same_process(os.getpid(), me)
    assert abs(me + psutil.boot_time() - psutil.Process().create_time()) < 1.0  # psutil's figure, less the boot time
    child = subprocess.Popen(["sleep", "30"])
    start = processes.started(child.pid)
    assert processes.same_process(child.pid, start) and not processes.same_process(child.pid, start + 1)
    child.kill()
    time.sleep(0.3)
    assert processes.started(child.pid) is None, "a zombie has exited"
    child.wait()
    assert processes.started(child.pid) is None and not processes.same_process(child.pid, start)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux /proc")
def test_a_stepped_wall_clock_does_not_make_a_live_owner_look_dead(monkeypatch):
    import psutil._pslinux as linux

    owner, holder = ray_runtime.identity(os.getpid()), Owner.me()
    before, booted = psutil.Process().create_time(), psutil.boot_time()
    monkeypatch.setattr(linux, "boot_time", lambda: booted + 100.0)  # what a clock step does to psutil's figure
    assert psutil.Process().create_time() - before == pytest.approx(100.0, abs=0.1)
    assert ray_runtime.alive(owner) and not holder.dead_here()


def test_without_proc_psutil_tells_a_live_process_from_a_gone_one(monkeypatch):
    """macOS has no /proc: every process must not look gone there."""
    monkeypatch.setattr(processes, "_PROC", False)
    me = processes.started(os.getpid())
    assert (
        me is not None
        and processes.same_process(os.getpid(), me)
        and ray_runtime.alive(ray_runtime.identity(os.getpid()))
    )
    child = subprocess.Popen(["true"])
    child.wait()
    assert processes.started(child.pid) is None
