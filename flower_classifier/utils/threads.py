"""How many threads the model may use: the cores that no other process is using.

Torch's threads meet at the end of every operation, so one thread that shares its core with
another process holds all of them back: two threads on two cores, one of them busy with a
browser, lose far more than the busy core (an epoch of the trained stages took 3.8 times its
idle time, and 1.9 times on one thread). So by default the threads follow the free cores:
measured from the machine's busy time (/proc/stat) less this process's own over a short window,
then again after each epoch, and shared among torchrun's processes on one machine. --threads N
fixes them.

    policy = ThreadPolicy(fixed=None)   # --threads left out: follow the free cores
    policy.apply()                      # before a job: torch (and so OpenVINO) threads set
    policy.apply(window)                # after an epoch: re-read over the epoch just run
"""
import os
import threading
import time

import torch

from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError

SAMPLE_SECONDS = 0.1  # the first reading's window, before any epoch has run
THREADS_VARIABLE = "FLOWER_CLASSIFIER_THREADS"  # --threads' default where set (the tests' 1)
STAT = "/proc/stat"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cores_available():
    """The cores this process may run on (its affinity mask), shared among the processes that
    torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cores // local_world)


def machine_busy_seconds():
    """Seconds of CPU time all processes have used since boot (None off Linux)."""
    try:
        with open(STAT, encoding="ascii") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / TICKS_PER_SECOND


def own_seconds():
    """CPU seconds this process has used (all its threads)."""
    times = os.times()
    return times.user + times.system


class Window:
    """A stretch of time over which the other processes' CPU use is read."""

    def __init__(self):
        self.started, self.busy, self.own = time.monotonic(), machine_busy_seconds(), own_seconds()

    def others_busy_cores(self):
        """How many cores the other processes kept busy since the window opened (None where
        it cannot be told)."""
        busy = machine_busy_seconds()
        elapsed = time.monotonic() - self.started
        if busy is None or self.busy is None or elapsed <= 0:
            return None
        others = (busy - self.busy) - (own_seconds() - self.own)
        return max(0.0, others / elapsed)


def free_cores(window=None):
    """The cores of cores_available() that other processes left free over window (a fresh
    SAMPLE_SECONDS one when None); all of them where it cannot be told."""
    cores = cores_available()
    if window is None:
        window = Window()
        time.sleep(SAMPLE_SECONDS)
    busy = window.others_busy_cores()
    if busy is None:
        return cores
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(cores, max(1, round(cores - busy / local_world)))


def default_threads():
    """--threads' default: $FLOWER_CLASSIFIER_THREADS where set, else None (the free cores)."""
    text = os.environ.get(THREADS_VARIABLE)
    if not text:
        return None
    if not text.isdigit():
        raise UserError(f"${THREADS_VARIABLE}={text!r} is not a whole number; set it to 1 or "
                        "more, or unset it")
    return int(text)


def check_threads(threads):
    """A clear error for a --threads no machine has; a warning for more threads than cores."""
    if threads is None:
        return None
    if threads < 1:
        raise UserError(f"--threads {threads}: give 1 or more, or leave it out to follow the "
                        "free cores")
    if threads > (os.cpu_count() or 1):
        warn(f"--threads {threads} is more than this machine's {os.cpu_count()} cores; threads "
             "beyond the cores only wait for each other")
    return threads


class ThreadPolicy:
    """torch's intra-op threads (OpenVINO compiles with the same count): fixed, or the free
    cores, re-read whenever apply() is given the window of the work just done."""

    def __init__(self, fixed=None):
        self.fixed = fixed  # checked by the command line (check_threads)
        self.window = None

    def apply(self, window=None):
        """Set torch's threads; returns them. window: the Window the last work ran in (an
        epoch), whose other processes' CPU use decides; None reads a short fresh one."""
        threads = self.fixed or free_cores(window)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.window = Window()
        return threads

    def after(self):
        """Re-apply over the window opened by the last apply(): call it between epochs."""
        return self.apply(self.window)


def lower_priority(niceness=10):
    """This thread yields the cores to the process's other threads and to other processes
    (Linux: a thread is a task with its own niceness); elsewhere it keeps the process's."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass
