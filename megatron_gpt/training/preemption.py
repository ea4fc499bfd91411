"""Preemption: SIGTERM or SIGUSR1 on any rank -> every rank saves at the same step boundary and the
run exits with EXIT_CODE; relaunching resumes from that checkpoint (checkpoint.resume).

The signal handler only records the signal. At each step boundary the ranks agree with one
all-reduce (MAX of "did I get a signal"; where the trainer all-reduces the gradients itself, the
votes ride in that all-reduce instead: training.gradients.GradientPath), so a signal that reached
one rank stops them all at the same step, where the Trainer flushes metrics, saves collectively and
raises :class:`Preempted`. This module only watches; exit codes and signals are launch.protocol's.
"""

from __future__ import annotations

import os
import signal
import sys

from megatron_gpt.launch.protocol import EXIT_CODE, EXIT_FILE, SIGNALS
from megatron_gpt.parallel.vote import any_rank


class Preempted(Exception):
    """Raised at the step boundary where the run stopped; `step` is the last completed step."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"preempted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class Watcher:
    """Records the first SIGTERM/SIGUSR1; `requested` asks all ranks whether any got one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "Watcher":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore(self) -> None:
        """Once stopping: ignore further signals. A launcher that sees one rank exit non-zero
        (srun --kill-on-bad-exit, DeepSpeed's launch) SIGTERMs the others; Python resets its own
        handlers to the default at interpreter exit (killing a rank that is exiting 75 anyway),
        but keeps SIG_IGN."""
        for sig in SIGNALS:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"rank {os.environ.get('RANK', '0')}: received {signal.Signals(signum).name}; "
                  "saving a checkpoint at the next step boundary", file=sys.stderr, flush=True)

    def requested(self, shared_memory: bool = False) -> bool:
        """Collective over all ranks: True on every rank if any rank got a signal (answered on the
        host, see parallel.vote). `shared_memory`: Topology.shared_memory."""
        return any_rank(self.received is not None, shared_memory)


_watcher: Watcher | None = None


def watch() -> Watcher:
    """The process's watcher, installing the signal handlers on first use (main thread only)."""
    global _watcher
    if _watcher is None:
        _watcher = Watcher()
        try:
            _watcher.install()
        except ValueError:  # not the main thread (e.g. training called from a worker thread)
            pass
    return _watcher


def exit_code() -> int:
    """What a preempted rank returns: EXIT_CODE, or 0 after writing EXIT_CODE to the launcher's file."""
    path = os.environ.get(EXIT_FILE)
    if not path:
        return EXIT_CODE
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(str(EXIT_CODE))
        return 0
    except OSError:
        return EXIT_CODE
