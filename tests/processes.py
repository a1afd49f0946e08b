"""The processes a test's subprocess made, read from /proc (Linux): on CPU stalerl forks its fresh
processes (sweep workers, a rollout worker process) from a fork server, a child of its own, so they
are that server's children, not the subprocess's."""

from pathlib import Path


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def made_by(pid: int) -> list[int]:
    """The processes `pid` made through multiprocessing: forked by its fork server or its own children,
    the fork server and the resource tracker left out."""
    made = []
    for child in children_of(pid):
        command = Path(f"/proc/{child}/cmdline").read_text()
        if "forkserver" in command:
            made += children_of(child)
        elif "resource_tracker" not in command:
            made.append(child)
    return made


def descendants_of(pid: int) -> list[int]:
    return [child for direct in children_of(pid) for child in [direct, *descendants_of(direct)]]


def is_gone(pid: int) -> bool:
    try:  # gone, or a zombie that the reaper has not collected yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
