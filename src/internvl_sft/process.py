"""Process lifetime under torchrun."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Make this torchrun worker die when its launcher dies, however it dies.

    torchrun starts each worker in a session of its own, so killing the launcher's process group (Ctrl-C
    escalated to SIGKILL, `kill -9`, an out-of-memory kill) would leave the workers training on, unseen, and
    writing into the checkpoints a resumed run is reading. Linux only; elsewhere, and outside torchrun, nothing.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
