"""CPU ranks: DeepSpeed's shared-memory all-reduce, host-memory reuse, threads per rank."""
