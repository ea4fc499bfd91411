"""Checkpoints: storing them (`store`: tags, `latest`, pruning, metadata), the layout-independent
format (`universal`) and moving engine state in and out of it (`engine_state`), planning what a
run starts from (`restore`), and reading any checkpoint as one model (`reader`)."""

from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.restore import Restore, find_resume, plan_restore, resolve_universal
from megatron_gpt.checkpoint.store import METADATA, complete_checkpoints, latest_tag, save, tag_for

__all__ = ["METADATA", "CheckpointError", "Restore", "complete_checkpoints", "find_resume", "latest_tag", "plan_restore",
           "resolve_universal", "save", "tag_for"]
