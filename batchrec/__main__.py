"""`python -m batchrec ...`: the command line, e.g. for launchers that start a module
(`torchrun --nproc-per-node 2 -m batchrec train multvae`)."""

from batchrec.cli import main

if __name__ == "__main__":
    main()
