"""The error a command raises when it cannot do its job for a reason the user can fix.

Its message is one line saying what went wrong and what to check. The `rlhf` entry point
prints it and exits 1, without a traceback; clients (e.g. the trainer's) translate their
transport's errors into it, so commands never handle gRPC errors one by one.
"""

from __future__ import annotations


class CommandError(Exception):
    """A failure to report to the user as one line (no traceback)."""
