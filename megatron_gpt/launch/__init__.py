"""Starting ranks: the commands each launcher type runs (`commands`), the environment forwarded to
ranks (`environment`), sbatch scripts (`slurm`), and the per-rank discovery of RANK/WORLD_SIZE/
MASTER_ADDR under srun and mpirun (`ranks`). Nothing here joins a process group;
`megatron_gpt.launch.run` runs the commands."""
