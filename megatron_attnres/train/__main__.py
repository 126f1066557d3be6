"""`python -m megatron_attnres.train`: the same entry point as `attnres-train`."""

import sys

from megatron_attnres.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
