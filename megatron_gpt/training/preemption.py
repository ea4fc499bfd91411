"""Preemption: SIGTERM or SIGUSR1 on any rank -> every rank saves at the same step boundary and the
run exits with EXIT_CODE; relaunching resumes from that checkpoint (checkpoint.resume).

The signal handler only records the signal. At each step boundary the ranks agree with one
all-reduce (MAX of "did I get a signal"; where GradientSync all-reduces the gradients, the votes
ride in that all-reduce instead: Trainer.stop_requested), so a signal that reached one rank stops
them all at the same step, where they flush metrics, save collectively and raise :class:`Preempted`.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_CODE = 75
"""Exit code of a run stopped for preemption after saving (EX_TEMPFAIL: "try again later")."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_FILE = "MEGATRON_GPT_EXIT_FILE"
"""Set by the local launcher (torchrun treats a non-zero rank exit as a failure): ranks write
EXIT_CODE there and exit 0, and the launcher exits with EXIT_CODE."""


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
        self._gloo = None

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

    def requested(self) -> bool:
        """Collective over all ranks: True on every rank if any rank got a signal. Asked every step,
        so it stays on the host: through shared memory where every rank is on one CPU host (see
        shared_memory), else over the default group when that is gloo (CPU), else over a gloo
        group of the same ranks; an NCCL all-reduce plus .item() would make the host wait for
        every queued kernel each step."""
        import torch
        import torch.distributed as dist

        from megatron_gpt import shared_memory

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received is not None
        if shared_memory.active():
            flag = torch.tensor([0.0 if self.received is None else 1.0])
            shared_memory.all_reduce(flag)
            return flag.item() > 0
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group())
        return bool(flag.item())

    def _host_group(self):
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            return None
        if self._gloo is None:  # every rank reaches its first check at the same step: new_group is collective
            self._gloo = dist.new_group(backend="gloo")
        return self._gloo


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


def stop(trainer, step: int):
    """Flush metrics, save a checkpoint at `step` (unless one was just saved there), raise Preempted."""
    from megatron_gpt.training import checkpoint

    cfg = trainer.cfg
    trainer.metrics.flush()
    path = None
    if cfg.checkpoint.save_dir:
        if checkpoint.latest_tag(cfg.checkpoint.save_dir) == checkpoint.tag_for(step):
            path = os.path.join(cfg.checkpoint.save_dir, checkpoint.tag_for(step))
        else:
            path = trainer.save(step)
        trainer.say(f"preempted: saved checkpoint {path} at step {step}; exiting with code {EXIT_CODE}, "
                    "relaunch to resume from it")
    else:
        trainer.say(f"preempted at step {step}: checkpoint.save_dir is not set, nothing saved; "
                    f"exiting with code {EXIT_CODE}")
    watch().ignore()
    raise Preempted(step, path)


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
