"""Give the calling thread its Python name in the kernel too, so that `top -H`, `ps -L` and
/proc/PID/task/*/comm show "recorder", "publisher", "bus:rs485" instead of "python3" (the operator
sees which part of the agent uses the CPU). Linux only; elsewhere, and on any error, a no-op.
"""

from __future__ import annotations

import ctypes
import sys
import threading

PR_SET_NAME = 15
_NAME_MAX = 15  # the kernel keeps 15 bytes and the terminating NUL

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def name_this_thread() -> None:
    if _prctl is None:
        return
    name = threading.current_thread().name.encode("utf-8", "replace")[:_NAME_MAX]
    try:
        _prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, ctypes.ArgumentError):
        pass
