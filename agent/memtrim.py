"""Give freed heap memory back to the operating system (glibc `malloc_trim`; a no-op elsewhere).

Called once the configuration is loaded (parsing and validating it leaves megabytes of garbage:
YAML nodes, schema drafts), before the station starts, and after a large backlog has been sent: the
gateway's memory is small and the agent runs for months, so its resident size should follow what it
holds, not what it once held.
"""

from __future__ import annotations

import ctypes
import gc

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def release_free_memory(*, collect: bool = False) -> None:
    """Return free heap pages to the system; with `collect`, run the cyclic garbage collector first."""
    if collect:
        gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
