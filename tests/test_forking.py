"""Processes forked from the preloaded fork server behave as spawned ones: the parent's environment
of now, not the server's, and SIGINT / SIGTERM held back until they take them."""

import concurrent.futures
import os
import signal

import pytest
import torch

from stalerl import forking
from stalerl.guards import STOP_SIGNALS


def _report(environment: dict[str, str], take_signals: bool) -> dict:
    blocked_at_start = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    forking.adopt_environment(environment)
    if take_signals:
        forking.take_stop_signals()
    return {"variable": os.environ.get("STALERL_TEST_FORKING"), "blocked_at_start": blocked_at_start,
            "blocked_now": signal.pthread_sigmask(signal.SIG_BLOCK, []), "parent": os.getppid(),
            "forked_by_server": forking.forked_by_server(), "makes_with": forking.context().get_start_method()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU processes are spawned")
def test_a_forked_process_has_the_parents_environment_and_takes_stop_signals_when_ready(monkeypatch):
    assert forking.start_method() == "forkserver"
    forking.start_server()  # before the variable is set: the server's environment lacks it
    monkeypatch.setenv("STALERL_TEST_FORKING", "set after the server started")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=forking.context()) as pool:
        held = pool.submit(_report, dict(os.environ), False).result()
        taken = pool.submit(_report, dict(os.environ), True).result()
    assert held["parent"] != os.getpid()  # forked by the server, not by this process
    assert held["forked_by_server"] and not forking.forked_by_server()
    assert held["makes_with"] == "spawn"  # Python 3.11 gives a forked process no way to that server
    assert held["variable"] == "set after the server started"
    assert set(STOP_SIGNALS) <= held["blocked_at_start"] and set(STOP_SIGNALS) <= held["blocked_now"]
    assert not set(STOP_SIGNALS) & taken["blocked_now"]
    assert not set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this process is untouched


def test_environment_adoption_removes_what_the_parent_does_not_have(monkeypatch):
    monkeypatch.setenv("STALERL_TEST_FORKING", "only here")
    parent = {key: value for key, value in os.environ.items() if key != "STALERL_TEST_FORKING"}
    forking.adopt_environment(parent)
    assert "STALERL_TEST_FORKING" not in os.environ and dict(os.environ) == parent
