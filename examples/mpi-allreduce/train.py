"""A distributed job: every rank contributes a vector, MPI allreduce sums them, each rank checks the result.

Run it with ``distributed_training=MpiConfiguration()`` and any node_count x process_count_per_node.
"""

import os
import socket

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
if "RANK" in os.environ:  # under cadre; the script also runs under a plain mpiexec
    assert rank == int(os.environ["RANK"]) and size == int(os.environ["WORLD_SIZE"]), "MPI and cadre disagree"

local = np.full(4, rank + 1, dtype=np.float64)
total = np.empty_like(local)
comm.Allreduce(local, total, op=MPI.SUM)
expected = size * (size + 1) / 2
print(
    f"rank {rank}/{size} node_rank={os.environ.get('NODE_RANK')} local_rank={os.environ.get('LOCAL_RANK')} "
    f"gpus={os.environ.get('CUDA_VISIBLE_DEVICES')!r} host={socket.gethostname()} allreduce={total[0]:g}"
)
assert np.all(total == expected), f"allreduce gave {total}, expected {expected}"
if rank == 0:
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/allreduce.txt", "w") as fh:
        fh.write(f"{size} {total[0]:g}\n")
    print(f"world of {size}: allreduce ok ({total[0]:g})")
