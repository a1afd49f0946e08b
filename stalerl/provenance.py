"""What made a run: stalerl's version (and its git revision, in a checkout), the versions of the
libraries whose arithmetic a run depends on, and the device. A seed fixes an exact-lag run bit for
bit on one machine with one software stack; summary.json records which, so that a run that does not
reproduce elsewhere can be traced to a difference here."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import stalerl

LIBRARIES = ("torch", "transformers", "numpy", "vllm", "ray", "peft", "math-verify")


def library_versions() -> dict[str, str]:
    """The installed version of each library in LIBRARIES that is installed."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_revision() -> str | None:
    """The commit of the stalerl checkout this code runs from, "+dirty" when tracked files differ from it;
    None where stalerl is not a checkout of its own (an installed wheel) or git is missing."""
    root = Path(stalerl.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # not inside some other repository that holds an installed stalerl
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, object]:
    """The software and machine a run ran on (summary.json's `environment`)."""
    import torch

    return {
        "stalerl": stalerl.__version__,
        "stalerl_git": git_revision(),
        "python": platform.python_version(),
        **library_versions(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        # torch picks its CPU kernels by the instruction set, and they round differently: with the same
        # seed and code the embedded default's warm start scores 0.324 with AVX2 kernels and 0.355 with
        # ATEN_CPU_CAPABILITY=default (README, "Measured on the embedded default")
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def version_line() -> str:
    """`stalerl --version`: stalerl's version and the libraries' that decide its numbers."""
    versions = library_versions()
    libraries = ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "vllm", "ray")
                          if name in versions)
    revision = git_revision()
    if revision is None:
        return f"stalerl {stalerl.__version__}; {libraries}"
    short = revision[:12] + ("+dirty" if revision.endswith("+dirty") else "")
    return f"stalerl {stalerl.__version__} (git {short}); {libraries}"
