"""Only the engine thread keeps an OpenMP team (server/compute_threads.py):
helper threads run torch on themselves alone, and the server is assembled in
a thread that ends."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from loramux.server.compute_threads import helper_executor, run_in_passing_thread


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def big_parallel_op() -> int:
    """A torch op far above the intra-op grain (so it runs a parallel region where it may); the
    calling thread's torch thread count."""
    x = torch.randn(4_000_000)
    (x * 2).sum()
    return torch.get_num_threads()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 or more torch threads to tell")
def test_a_helper_thread_runs_torch_without_a_team_of_its_own():
    with helper_executor() as pool:
        pool.submit(lambda: None).result()  # the helper thread exists now
        before = os_threads()
        assert pool.submit(big_parallel_op).result() == 1
        assert os_threads() == before, "the helper started OpenMP workers"
    # a plain thread runs torch with a team of the process's size: the checks above can fail
    sizes = []
    plain = threading.Thread(target=lambda: sizes.append(big_parallel_op()))
    plain.start()
    plain.join()
    assert sizes == [torch.get_num_threads()] and torch.get_num_threads() >= 2


def test_run_in_passing_thread_returns_and_raises_in_the_caller():
    names = []
    assert run_in_passing_thread(lambda: names.append(threading.current_thread().name) or 7, "passing") == 7
    assert names == ["passing"] and "passing" not in [t.name for t in threading.enumerate()]

    def fail():
        raise FileNotFoundError("no model here")

    with pytest.raises(FileNotFoundError, match="no model here"):
        run_in_passing_thread(fail)
