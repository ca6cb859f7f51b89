"""`python -m bench`: run the benchmarks that exist so far (MoE strategies)."""

import sys

from bench import moe_strategies

if __name__ == "__main__":
    sys.exit(moe_strategies.main(sys.argv[1:]))
