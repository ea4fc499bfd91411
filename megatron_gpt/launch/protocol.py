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
DIVERGED_EXIT_CODE = 65
"""Exit code of a run stopped by the divergence guard (training.max_skipped_steps non-finite or
spiking steps in a row; EX_DATAERR): nothing from those steps was applied or saved."""
ERROR_FILE = "MEGATRON_GPT_ERROR_FILE"
"""Set by the launcher: a rank that stops on an error appends `CODE<TAB>RANK<TAB>one-line message`;
the launcher prints the first such line last (under torchrun's traceback) and exits with CODE."""
