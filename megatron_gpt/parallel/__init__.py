"""Process groups and the Topology (groups), DeepSpeed's mpu (mpu), and CPU-only helpers (cpu/)."""
