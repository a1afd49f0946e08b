"""What stops a run cleanly: non-finite updates, Ctrl-C/SIGTERM, a full disk, prompts too long.

Each ends with one line that says what happened and, where a checkpoint exists, how to go on:
``stalerl train --resume RUN``. The cli turns `RunStopped` into that line and its exit code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Callable, Iterator

from stalerl.config import ConfigError

if TYPE_CHECKING:  # the cli imports this module for RunStopped before torch and transformers load
    from stalerl.data import MathTask
    from stalerl.rewards import GuardedTask
    from stalerl.tasks import AdditionTask


def exit_with(pid: int, name: str) -> None:
    """A child process (a bench run, a rollout worker) ends itself once process `pid` (its bench or
    learner) has ended without closing it: nobody will read what it makes."""
    when_ended(pid, lambda: os._exit(1), name)


def when_ended(pid: int, action: Callable[[], None], name: str) -> None:
    """Calls action() in a daemon thread once process `pid` has ended (at once if it has). `pid` need
    not be the parent: a process forked by a fork server is the server's child, and the server lives
    as long as its children do. The thread waits on a pidfd; it polls where the OS has none."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:  # ended already
        handle = -1
    except (AttributeError, OSError):  # not Linux >= 5.3
        handle = None

    def watch() -> None:
        if handle is None:
            with contextlib.suppress(ProcessLookupError):
                while True:
                    os.kill(pid, 0)
                    time.sleep(0.5)
        elif handle >= 0:
            select.select([handle], [], [])  # readable once the process has ended
        action()

    threading.Thread(target=watch, name=name, daemon=True).start()


class RunStopped(RuntimeError):
    """The run stopped before its last step; the message says why and how to resume."""

    exit_code = 4


class Interrupted(RunStopped):
    exit_code = 130  # the shell's code for a run ended by Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM while no run holds the stop signals (StopRequests): while the command imports torch and
    transformers, builds the policy or writes its figures (cli.main). It unwinds as Ctrl-C does, so the
    same clean-up runs; before, the process died silently with 143."""


def resume_hint(run_dir: Path, checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint was written"
    return f"checkpoint {checkpoint}; continue with: stalerl train --resume {run_dir}"


class BadStepGuard:
    """Counts skipped (non-finite) updates in a row; `stop` after `max_bad_steps` of them."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.streak: list[tuple[int, float, float]] = []  # (step, loss, grad_norm) of the bad steps in a row

    def observe(self, step: int, stats: dict) -> bool:
        """Records the step; True when the run must stop."""
        if not stats["skipped_update"]:
            self.streak.clear()
            return False
        self.streak.append((step, stats["loss"], stats["grad_norm"]))
        return len(self.streak) >= self.max_bad_steps

    def stop(self, run_dir: Path, checkpoint: Path | None) -> RunStopped:
        first, loss, grad_norm = self.streak[0]
        return RunStopped(
            f"{len(self.streak)} non-finite updates in a row (steps {first}-{self.streak[-1][0]}; first: loss={loss}, "
            f"grad_norm={grad_norm}), each skipped; stopped (guard.max_bad_steps={self.max_bad_steps}). "
            f"State from before step {first}: {resume_hint(run_dir, checkpoint)}")


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back (not lost) in this thread, e.g. while their handlers are swapped."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# A stop asked for from another thread: the Ray driver's Ctrl-C or SIGTERM, forwarded to the learner
# actor (ray_runtime.LearnerActor.request_stop), whose loop reads it as it reads its own signals.
_forwarded_stop: list[str] = []


def request_stop(signal_name: str) -> None:
    """Asks the running loop of this process to stop after its step, as its own signal would."""
    _forwarded_stop.append(signal_name)


class StopRequests:
    """Ctrl-C and SIGTERM ask the loop to stop after the step in progress, so that the checkpoint it
    writes is consistent; a second signal stops at once, unless `quit_on_second` is off. Only the
    main thread can take signals: elsewhere (a Ray actor, a thread) this does nothing, and a stop
    reaches the loop by request_stop.

    A sweep worker holds one with `quit_on_second` off between its cells (lab/sweep.py). A run's
    StopRequests installed over it takes over its request (a stop asked for while the run was
    starting: the run stops after its first step), never quits mid-step either, since only the
    sweep decides to quit at once (it kills its workers), and hands its own request back to it."""

    def __init__(self, quit_on_second: bool = True):
        self.quit_on_second = quit_on_second
        self._requested: str | None = None
        self._previous: dict[int, object] = {}
        self._enclosing: StopRequests | None = None

    def install(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self
        with stop_signals_blocked():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        enclosing = getattr(self._previous[signal.SIGTERM], "__self__", None)
        if isinstance(enclosing, StopRequests) and not enclosing.quit_on_second:
            self._enclosing, self.quit_on_second = enclosing, False
            self.requested = self.requested or enclosing.requested
        return self

    @property
    def requested(self) -> str | None:
        """The name of the signal that asked for a stop (here or forwarded: request_stop), or None."""
        return self._requested or (_forwarded_stop[0] if _forwarded_stop else None)

    @requested.setter
    def requested(self, name: str | None) -> None:
        self._requested = name

    def uninstall(self) -> None:
        _forwarded_stop.clear()  # the request was this run's
        with stop_signals_blocked():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous.clear()
        if self._enclosing is not None and self.requested:
            self._enclosing.requested = self._enclosing.requested or self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            if self.quit_on_second:
                raise KeyboardInterrupt
            return
        self.requested = signal.Signals(signum).name
        print(f"stalerl: {self.requested}: stopping after this step with a checkpoint (again to quit at once)",
              file=sys.stderr, flush=True)


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: OSError, run_dir: Path, checkpoint: Path | None) -> RunStopped:
    where = f" writing {error.filename}" if error.filename else ""
    then = (f"{resume_hint(run_dir, checkpoint)} once there is space" if checkpoint is not None else
            f"no checkpoint was written; once there is space, stalerl train --resume {run_dir} starts it over")
    return RunStopped(f"disk full ({error.strerror}){where}; {then}")


def check_output_directory(path: Path | str, option: str) -> None:
    """output_directory's checks without making anything: where a refusal further on must leave no
    directory behind. Its nearest existing ancestor must be a directory that can be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a directory")
    absolute = path.absolute()
    existing = next(parent for parent in (absolute, *absolute.parents) if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: cannot write there ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only file system too
        raise ConfigError(f"{option} {path}: cannot write there ({existing} is not writable)")


def output_directory(path: Path | str, option: str) -> Path:
    """Makes `path` (with its parents) and checks that files can be written in it, before any work:
    a read-only file system or a file in the way is one line naming `option`, not a traceback later."""
    path = Path(path)
    check_output_directory(path, option)
    try:  # and a file is written: os.access can say yes where a write fails (a full or odd file system)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".stalerl-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{option} {path}: cannot write there ({error.strerror})") from None
    return path


def check_prompt_lengths(task: AdditionTask | MathTask | GuardedTask, tokenizer, context: int | None,
                         max_new_tokens: int) -> None:
    """Refuses, before any work, a prompt that leaves no room for `max_new_tokens` in the context."""
    from stalerl.rewards import GuardedTask

    if not context:
        return
    base = task.task if isinstance(task, GuardedTask) else task
    prompts = [*base.train, *base.val]
    lengths = [len(ids) for ids in tokenizer([prompt.text for prompt in prompts]).input_ids]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > context:
        text = prompts[longest].text
        raise ConfigError(
            f"rollout.max_new_tokens: the longest prompt ({lengths[longest]} tokens, {text[:40]!r}"
            f"{'...' if len(text) > 40 else ''}) plus {max_new_tokens} new tokens exceeds the model's context "
            f"of {context} positions; shorten the prompts or lower rollout.max_new_tokens")
