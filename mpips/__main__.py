"""``python -m mpips`` and the ``mpips-train`` command: ``mpips.train``'s main, launch checked first."""

import sys


def main() -> int:
    from mpips.launch import before_mpi_init

    before_mpi_init()  # before mpips.train imports mpi4py.MPI (MPI_Init)
    from mpips.train import main as train_main

    return train_main()


if __name__ == "__main__":
    sys.exit(main())
