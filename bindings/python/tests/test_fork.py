"""dynq in a child process made by fork() after the parent used its worker pool (Python's
multiprocessing with the fork start method, pre-forking servers that load the model first)."""

import os
import sys

import numpy as np
import pytest

import dynq

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"), reason="needs fork() and Linux /proc"
)


def _dynq_worker_threads():
    """Names of this process's threads that belong to dynq's pool."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("dynq-"):
            names.append(name)
    return names


def _wait_for_worker_threads(seconds=5.0):
    """The pool's thread names: a new thread names itself once it first runs, and on a loaded
    machine the call that started the pool can finish before that, so give the names up to
    `seconds` to appear."""
    import time

    deadline = time.monotonic() + seconds
    names = _dynq_worker_threads()
    while not names and time.monotonic() < deadline:
        time.sleep(0.01)
        names = _dynq_worker_threads()
    return names


def test_child_after_fork_gets_its_own_pool_and_the_same_bits():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    a = rng.standard_normal((96, 384)).astype(np.float32)
    packed = dynq.PackedWeights.from_float(w, layout="kn")
    # Large enough for dynq to use two workers; this starts the parent's pool.
    want = dynq.gemm(packed, a, num_threads=2)
    assert _wait_for_worker_threads(), "the parent's pool should be running"

    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(r)
            # The child inherits no threads: only the forking thread exists here.
            before = _dynq_worker_threads()
            got = [dynq.gemm(packed, a, num_threads=2) for _ in range(3)]
            after = _wait_for_worker_threads()
            same = all(np.array_equal(g, want) for g in got)
            msg = f"before={len(before)} after={len(after)} same={same}"
            os.write(wfd, msg.encode())
            code = 0
        except BaseException as e:  # pragma: no cover - reported to the parent
            os.write(wfd, f"error {e!r}".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(r) as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report
    fields = dict(kv.split("=") for kv in report.split())
    assert fields["same"] == "True", report
    assert fields["before"] == "0", report
    # Without a pool of its own the child would silently run every call on one thread.
    assert int(fields["after"]) >= 1, report


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
