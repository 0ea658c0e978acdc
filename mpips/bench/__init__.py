"""Benchmarks that put mpips next to its baselines, measured in the same MPI job.

    mpirun -n 4 python -m mpips.bench all --json bench.json   # everything, small sizes
    mpirun -n 4 python -m mpips.bench rma --sizes 1M,100M,1G  # pull bandwidth
    mpirun -n 1 python -m mpips.bench apply --params 64M      # server optimizer throughput
    mpirun -n 4 python -m mpips.bench train --models mlp      # vs DDP (gloo) and Allreduce
    mpirun -n 4 python -m mpips.bench data                    # data servers vs raw h5py

See ``python -m mpips.bench --help`` and the README's "Performance" section.
"""

__all__: list[str] = []
