"""`python -m bench [--quick]`: speed against transformers and the machine's limits (bench/speed.py)."""

import sys

from bench import speed

if __name__ == "__main__":
    sys.exit(speed.main(sys.argv[1:]))
