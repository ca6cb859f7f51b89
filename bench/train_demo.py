"""Train the demo model: a small Mixtral (real tokenizer, 8 experts top-2) on the Python standard library.

    python -m bench.train_demo OUT_DIR [extra `mixtral-jax train` flags for both stages ...]

Data: every `.py` file under `sysconfig.get_paths()['stdlib']`, without `site-packages` and test
directories, in sorted order, as one stream of shuffled 128-token sequences (the same seed, so the same
order; each epoch reshuffled). Four stages, each continuing the last one's exported model where the
stream left off, with a fresh warm-up and cosine: stage 1 trains from scratch on the first 14,400
sequences (`OUT_DIR/stage1/`); stage 2 takes the next 7,200 at half the peak rate (`OUT_DIR/stage2/`);
stage 3 the next 16,000 (the rest of the first epoch, then the start of the second) at the same rate
(`OUT_DIR/stage3/`); stage 4 the next 16,000 (the second epoch) at two thirds of that.
The trained model is `OUT_DIR/final` (bf16, under 20 MB on disk). Stages up to the last one whose
`final` exists are not run again.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig

from mixtral_jax.loading.demo import DEMO_CONFIG as DEMO_TRAIN_CONFIG  # the shape the embedded demo model has


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep, os.sep + "tests" + os.sep,
            os.sep + "idle_test" + os.sep)
    return [f for f in files if not any(s in f for s in skip)]


COMMON = ["--batch", "16", "--seq-len", "128", "--save-every", "50", "--log-every", "10",
          "--export-dtype", "bfloat16"]
STAGE1 = ["--steps", "900", "--lr", "3e-3", "--warmup", "30"]
STAGE2 = ["--steps", "450", "--lr", "1.5e-3", "--warmup", "20", "--skip-sequences", str(900 * 16)]
STAGE3 = ["--steps", "1000", "--lr", "1.5e-3", "--warmup", "20", "--skip-sequences", str((900 + 450) * 16)]
STAGE4 = ["--steps", "1000", "--lr", "1e-3", "--warmup", "20", "--skip-sequences", str((900 + 450 + 1000) * 16)]


def main(argv: list[str]) -> int:
    import argparse

    from mixtral_jax.cli import train as train_command

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out, extra = argv[0], argv[1:]
    os.makedirs(out, exist_ok=True)
    config_file = os.path.join(out, "demo_config.json")
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(DEMO_TRAIN_CONFIG.to_dict(), f, indent=1)
    stage1, stage2, stage3 = (os.path.join(out, f"stage{i}") for i in (1, 2, 3))
    stages = [(stage1, ["--config", config_file, *STAGE1]),
              (stage2, ["--init-from", os.path.join(stage1, "final"), *STAGE2]),
              (stage3, ["--init-from", os.path.join(stage2, "final"), *STAGE3]),
              (out, ["--init-from", os.path.join(stage3, "final"), *STAGE4])]
    done = [os.path.isdir(os.path.join(where, "final")) for where, _ in stages]
    first = max((i + 1 for i, d in enumerate(done) if d), default=0)
    parser = argparse.ArgumentParser(allow_abbrev=False)
    train_command.register(parser.add_subparsers())
    for where, flags in stages[first:]:
        args = parser.parse_args(["train", "--out", where, "--data", *stdlib_files(), *COMMON, *flags, *extra])
        if rc := args.run(args):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
