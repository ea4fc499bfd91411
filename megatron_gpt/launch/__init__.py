"""Starting ranks: the command each launcher type runs (`plans`), running it with signals forwarded
(`run`), the environment forwarded to ranks (`environment`), sbatch scripts (`slurm`), the per-rank
discovery of RANK/WORLD_SIZE/MASTER_ADDR under srun and mpirun (`ranks`), and what launchers and
ranks agree on (`protocol`: exit codes, signals). Nothing here joins a process group or imports
training."""
