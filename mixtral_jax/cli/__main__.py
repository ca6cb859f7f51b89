"""`python -m mixtral_jax.cli`: the `mixtral-jax` command without its installed script."""

import sys

from mixtral_jax.cli.main import main

sys.exit(main())
