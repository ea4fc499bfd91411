"""What a run reports: metrics lines and metrics.jsonl, logging backends, FLOPs and MFU, the loss
plot, the profiler."""
