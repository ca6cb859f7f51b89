"""Train the demo model: a small Mixtral (real tokenizer, 8 experts top-2) on the Python standard library.

    python -m bench.train_demo OUT_DIR [--steps N] [extra `mixtral-jax train` flags ...]

Data: every `.py` file under `sysconfig.get_paths()['stdlib']`, without `site-packages` and test
directories, in sorted order. The trained model is `OUT_DIR/final` (bf16, under 20 MB on disk).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig

from mixtral_jax.demo import DEMO_CONFIG as DEMO_TRAIN_CONFIG  # the shape the embedded demo model has


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep, os.sep + "tests" + os.sep,
            os.sep + "idle_test" + os.sep)
    return [f for f in files if not any(s in f for s in skip)]


def main(argv: list[str]) -> int:
    import argparse

    from mixtral_jax import train_command

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out, extra = argv[0], argv[1:]
    os.makedirs(out, exist_ok=True)
    config_file = os.path.join(out, "demo_config.json")
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(DEMO_TRAIN_CONFIG.to_dict(), f, indent=1)
    flags = ["--config", config_file, "--steps", "900", "--batch", "16", "--seq-len", "128", "--lr", "3e-3",
             "--warmup", "30", "--save-every", "50", "--log-every", "10", "--export-dtype", "bfloat16", *extra]
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", out, "--data", *stdlib_files(), *flags])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
