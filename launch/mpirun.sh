#!/usr/bin/env bash
# One training rank under mpirun (Open MPI, MPICH, MVAPICH). Copy next to your job and run, e.g.:
#
#   mpirun -np 16 --hostfile hosts --npernode 8 -x PATH -x PYTHONPATH -x NCCL_SOCKET_IFNAME \
#       launch/mpirun.sh configs/my.yml --set training.train_steps=1000
#
# With mpi4py installed (pip install -e ".[mpi]") each rank learns its rank, the world size and
# rank 0's address through MPI, and nothing else is needed. Without mpi4py, pass rank 0's host as
# MASTER_ADDR (mpirun -x MASTER_ADDR=node1) and this script maps the MPI variables to torch's.
# MASTER_PORT defaults to launcher.master_port (29500). PYTHON picks the interpreter (default python3).
set -euo pipefail
if [ -n "${MASTER_ADDR:-}" ] && [ -z "${RANK:-}" ]; then
  export RANK="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${MV2_COMM_WORLD_RANK:-0}}}"
  export WORLD_SIZE="${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-${MV2_COMM_WORLD_SIZE:-1}}}"
  export LOCAL_RANK="${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${MV2_COMM_WORLD_LOCAL_RANK:-0}}}"
  export LOCAL_WORLD_SIZE="${OMPI_COMM_WORLD_LOCAL_SIZE:-${MPI_LOCALNRANKS:-${MV2_COMM_WORLD_LOCAL_SIZE:-1}}}"
  export MASTER_PORT="${MASTER_PORT:-29500}"
fi
exec "${PYTHON:-python3}" -u -m megatron_gpt.training.main "$@"
