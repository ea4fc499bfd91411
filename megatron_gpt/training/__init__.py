"""The training loop, optimizer schedule, evaluation, metrics and checkpoints."""
