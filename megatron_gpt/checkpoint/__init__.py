"""Checkpoints: storing them (`store`: tags, `latest`, pruning, metadata; `saving`: every rank
writes its own shard, synchronously or in the background), the pickle-free sharded format
(`sharded`), moving engine state in and out of it (`engine_state`), opening any checkpoint safely
(`opening`, `safety`), planning what a run starts from (`restore`), and reading any checkpoint as
one model (`reader`)."""

from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.opening import Checkpoint, open_checkpoint
from megatron_gpt.checkpoint.restore import Restore, find_resume, plan_restore
from megatron_gpt.checkpoint.saving import Saver, write_full
from megatron_gpt.checkpoint.store import METADATA, complete_checkpoints, latest_tag, tag_for

__all__ = ["METADATA", "Checkpoint", "CheckpointError", "Restore", "Saver", "complete_checkpoints", "find_resume",
           "latest_tag", "open_checkpoint", "plan_restore", "tag_for", "write_full"]
