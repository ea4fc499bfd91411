"""The training loop (trainer), how a step runs (runners, gradients, engine), the LR schedule,
validation, preemption, the per-rank entry point (main), the layout report and observe/ (metrics,
logging backends, FLOPs, loss plot, profiler)."""
