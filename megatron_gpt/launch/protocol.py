"""What launchers and ranks agree on: the signals that ask ranks to checkpoint and stop, the exit
code of a run stopped that way, and the file through which ranks report it under torchrun."""

from __future__ import annotations

import signal

EXIT_CODE = 75
"""Exit code of a run stopped for preemption after saving (EX_TEMPFAIL: "try again later")."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that make every rank save at the next step boundary and exit with EXIT_CODE."""
EXIT_FILE = "MEGATRON_GPT_EXIT_FILE"
"""Set by the local launcher (torchrun treats a non-zero rank exit as a failure): ranks write
EXIT_CODE there and exit 0, and the launcher exits with EXIT_CODE."""
