"""Errors a user can fix, and the one wrapper that turns them into a one-line message.

Every command's `main(argv)` is wrapped with `@command`: a `UserError` (bad config, data,
checkpoint, image, runner) prints `error: <message>` on stderr and exits 2, and so does torch
running out of memory (a GPU's, or a host allocation refused); nothing else is caught, so bugs
keep their traceback. It lives in the lowest layer so every command can use it.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; the message says what and, where it can, how."""


class WriteError(UserError, OSError):
    """A file could not be written where the user pointed (a file in the way, no permission, a full disk)."""


class ReportedElsewhere(UserError):
    """A UserError another process of the same job prints (a rank of a torchrun job): this one
    exits 2 without a second line, but only after giving that process GRACE_S to print: torchrun
    stops every rank as soon as one has failed, so a silent rank that left first could kill the
    one printing before its line (2 of 20 two-process runs on a loaded 2-core CPU had no line).
    torchrun ends the wait once the printing rank has exited."""
    GRACE_S = 10


def some(names: list[str]) -> str:
    """The first three names of a list, for a message."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def first_line(exc: BaseException) -> str:
    """An exception in one line (torch's and the MLflow stores' messages run to tracebacks; some have none)."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


HOST_ALLOCATION_REFUSED = "DefaultCPUAllocator: can't allocate memory"
ONEDNN_FAILED = "could not create a primitive"  # oneDNN's error for any failure, a refused allocation among them


def proc_field_bytes(proc_file_text: str, key: str) -> int:
    """A `Key:   N kB` line of /proc/self/status or /proc/meminfo, in bytes."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", proc_file_text, re.M).group(1)) * 1024


def host_memory_short() -> str | None:
    """How the host is short of memory for this process, where it is: its address space at half its
    limit or more (RLIMIT_AS, as `ulimit -v` sets), or under a tenth of the host's memory available."""
    import resource

    try:
        status, meminfo = Path("/proc/self/status").read_text(), Path("/proc/meminfo").read_text()
    except OSError:  # not Linux
        return None
    limit, used = resource.getrlimit(resource.RLIMIT_AS)[0], proc_field_bytes(status, "VmSize")
    if limit != resource.RLIM_INFINITY and used >= limit / 2:
        return f"{used / 2**30:.1f} of the process's {limit / 2**30:.1f} GiB address-space limit in use"
    available, total = proc_field_bytes(meminfo, "MemAvailable"), proc_field_bytes(meminfo, "MemTotal")
    if available < total / 10:
        return f"{available / 2**30:.1f} of the host's {total / 2**30:.1f} GiB available"
    return None


def out_of_memory(exc: BaseException) -> str | None:
    """What ran out, where `exc` is torch's error for a GPU out of memory (torch.OutOfMemoryError),
    torch's or numpy's for a host allocation the system refused (ENOMEM: past what Linux overcommits,
    or an address-space limit), or oneDNN's failure on a host short of memory; else None. The OOM
    killer gives the process no error at all."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__  # torch.compile wraps what its compiler raised
    if isinstance(inner, BaseException) and (found := out_of_memory(inner)):
        return found
    text = first_line(exc)
    if isinstance(exc, MemoryError):  # numpy's names the array: "Unable to allocate 1.26 GiB for an array with shape ..."
        return text if str(exc).strip() else "the host refused an allocation"
    if not isinstance(exc, RuntimeError):
        return None
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return ". ".join(text.split(". ")[:3])  # "CUDA out of memory. Tried to allocate X. GPU 0 has ... of which Y is free"
    if HOST_ALLOCATION_REFUSED in text:
        size = re.search(r"allocate (\d+) bytes", text)
        return f"the host refused {int(size.group(1)) / 2**20:,.0f} MiB more" if size else "the host refused an allocation"
    if ONEDNN_FAILED in text and (short := host_memory_short()):  # its allocation refused, most likely
        return f"oneDNN could not create a primitive, {short}"
    return None


def say_error(line: str) -> None:
    """Print a command's error line; under torchrun also write it to this worker's error file
    (TORCHELASTIC_ERROR_FILE), which torchrun's closing summary shows as the root cause in place of
    "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"."""
    print(line, file=sys.stderr)
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            record = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
            Path(path).write_text(json.dumps({"message": record}))  # the layout torch's own @record writes
        except OSError:  # the line is printed: that is what matters
            pass


_UNDO: list = []  # what the running command takes back if it fails, newest first


def undo_on_failure(action) -> None:
    """Something a command does before its work (an output folder made at its check) that it takes back
    when it fails, so a wrong option or a missing data root leaves nothing behind."""
    _UNDO.append(action)


def command(main):
    """Wraps a command's main(argv) -> int: one `error:` line and exit 2 on a UserError; a command that
    fails (any exit but 0) takes back what it registered with undo_on_failure."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        start, code = len(_UNDO), 1  # a command run by another (the quickstart's) takes back only its own
        try:
            code = _run(main, argv)
        finally:
            while len(_UNDO) > start:
                action = _UNDO.pop()
                if code not in (0, None):
                    action()
        return code
    return wrapped


def _run(main, argv) -> int:
    """main(argv), its user errors as one line and exit 2."""
    try:
        return main(argv)
    except ReportedElsewhere:
        time.sleep(ReportedElsewhere.GRACE_S)
        return 2
    except UserError as exc:
        say_error(f"error: {exc}")
        return 2
    except (RuntimeError, MemoryError) as exc:
        if (what := out_of_memory(exc)) is None:
            raise
        say_error(f"error: out of memory ({what})")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
