"""Errors a user can fix, and the one wrapper that turns them into a one-line message.

Every command's `main(argv)` is wrapped with `@command`: a `UserError` (bad config, data,
checkpoint, image, runner) prints `error: <message>` on stderr and exits 2; nothing else is
caught, so bugs keep their traceback. It lives in the lowest layer so every command can use it.
"""
from __future__ import annotations

import functools
import sys
import time


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


def command(main):
    """Wraps a command's main(argv) -> int: one `error:` line and exit 2 on a UserError."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except ReportedElsewhere:
            time.sleep(ReportedElsewhere.GRACE_S)
            return 2
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapped
