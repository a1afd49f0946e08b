"""Fresh processes that start at once: forked from a server that has imported stalerl.train (torch,
transformers) and run nothing else.

Importing torch and transformers takes about 4 s a process on 2 cores. The bench's timed runs, a
local sweep's workers and a run's rollout worker process (runtime.local_worker: process) are each a
fresh process (no allocator state, no torch threads of the parent's) and, on CPU, are forked from
multiprocessing's fork server instead of spawned: as fresh, but without the imports, and sharing
the imported pages with the server. Where torch sees a GPU they are spawned:
a process forked from one whose imports touched the CUDA driver cannot use CUDA, and the server's
imports have not been checked on a GPU (there a run takes minutes, so 4 s matter little).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal

from stalerl.guards import STOP_SIGNALS, stop_signals_blocked

PRELOADED = ["stalerl.train"]


def start_method() -> str:
    import torch

    return "spawn" if torch.cuda.is_available() else "forkserver"


def start_server() -> None:
    """Starts the fork server unless it runs. Called early (a sweep does, before its own imports), it
    imports on another core while the caller imports. It starts with SIGINT and SIGTERM blocked, and
    so does every process it forks: such a process takes them once it has its handlers (a sweep
    worker must not die of a stop signal before it can stop its cell), and the server itself survives
    a SIGTERM sent to every process of the job, which would otherwise break the pool it forked.
    A forked process calls take_stop_signals() once it is ready for them."""
    multiprocessing.set_forkserver_preload(PRELOADED)  # read when the server starts
    # The server starts multiprocessing's resource tracker unless it runs, and starting that unblocks
    # SIGINT and SIGTERM in the calling thread: it is started first, outside the block.
    multiprocessing.resource_tracker.ensure_running()
    with stop_signals_blocked():
        multiprocessing.forkserver.ensure_running()


def forked_by_server() -> bool:
    """Whether this process was forked by a fork server: in Python 3.11 it cannot use that server, so
    the fresh processes it makes are spawned (context() does so)."""
    parent = multiprocessing.parent_process()
    return parent is not None and parent.pid != os.getppid()  # a forked process's parent is the server


def context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """The context that makes fresh processes here: start_method()'s, or `method`'s; spawn in a
    process that the fork server made."""
    chosen = multiprocessing.get_context(method or ("spawn" if forked_by_server() else start_method()))
    if chosen.get_start_method() == "forkserver":
        start_server()
    return chosen


def ready() -> None:
    """Returns once a process can be made without waiting on imports: on CPU, when the fork server has
    imported what it preloads (a forked no-op returned). A timing that starts after this leaves them out."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context()) as pool:
        pool.submit(os.getpid).result()


def adopt_environment(environment: dict[str, str]) -> None:
    """What a forked process does first: it has the environment its server started with, not the one
    its parent has now (a spawned process has that), and takes the parent's, passed as `environment`."""
    if os.environ != environment:
        os.environ.clear()
        os.environ.update(environment)


def take_stop_signals() -> None:
    """SIGINT and SIGTERM, held back since the fork (start_server), reach this process from here on."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
