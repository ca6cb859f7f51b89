"""`mixtral-jax train`: train (or fine-tune) a Mixtral on text / JSONL files, with resumable checkpoints.

    mixtral-jax train --data corpus.jsonl --out run1 --config demo --steps 2000 --batch 16 --seq-len 256
    mixtral-jax train --data corpus.jsonl --out run1 --resume          # continue after an interruption

Writes `OUT/checkpoints/step_N/` (training state) and, at the end, `OUT/final/` (the trained model in the
converter's format: `mixtral-jax generate --checkpoint OUT/final`).
"""

from __future__ import annotations

import os
import sys

from flax import nnx

from mixtral_jax.cli.model_flags import NAMED_CONFIGS, model_config
from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.errors import ConfigError
from mixtral_jax.loading.checkpoint import load_checkpoint
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.training.data import PackedDataset
from mixtral_jax.training.trainer import TrainConfig, Trainer, list_checkpoints, read_train_state


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                       warmup_steps=args.warmup if args.warmup is not None else min(args.steps // 10, 100),
                       grad_accum=args.grad_accum, z_loss_coef=args.z_loss, seed=args.seed, mesh=args.mesh,
                       save_every=args.save_every, weight_decay=args.weight_decay, clip_norm=args.clip)


def run_train(args) -> int:
    tc = train_config(args)
    for p in args.data:  # fail on a missing file before anything slow
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p}")
    out = os.path.abspath(args.out)
    existing = list_checkpoints(out)
    if existing and not args.resume:
        raise FileExistsError(f"{out} already holds training checkpoints; pass --resume to continue, or another --out")
    if os.path.lexists(os.path.join(out, "final")) and not args.resume:
        raise FileExistsError(f"{out}/final already exists; choose another --out")
    if existing:  # the architecture comes from the checkpoint
        config = MixtralConfig.from_dict(read_train_state(existing[-1])["model_config"])
    else:
        config = model_config(args.config)
    tc.check_model(config)
    say = (lambda m: print(m, file=sys.stderr)) if not args.quiet else (lambda m: None)
    say(f"tokenizing {len(args.data)} file(s) ...")
    data = PackedDataset.from_files(args.data, tc.seq_len, seed=tc.seed)
    say(f"{len(data)} sequences of {tc.seq_len} tokens ({len(data) * tc.seq_len:,} tokens)")
    if args.init_from and not existing:
        model = load_checkpoint(args.init_from, dtype="float32")  # on one device: the Trainer shards it
        config = model.config
        tc.check_model(config)
    else:
        model = Mixtral(config, RuntimeConfig(), rngs=nnx.Rngs(tc.seed))
    trainer = Trainer(model, tc)
    del model
    if args.skip_sequences and not existing:  # e.g. the part of the stream an --init-from model already saw
        if args.skip_sequences < 0:  # past one epoch is fine: each epoch has its own order
            raise ConfigError(f"--skip-sequences must be >= 0, got {args.skip_sequences}")
        trainer.data_position = args.skip_sequences
    if existing:
        trainer.restore(existing[-1])
        say(f"resumed from {existing[-1]} (step {trainer.step})")
    n_params = sum(int(v.size) for v in trainer.params.values())
    say(f"model: {n_params / 1e6:.2f}M parameters, {config.n_layers} layers, "
        f"{config.n_experts} experts top-{config.top_k}")

    def log(step, m):
        if not args.quiet and (step % args.log_every == 0 or step == tc.steps):
            print(f"step {step:6d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  aux {m['aux']:.4f}  "
                  f"lr {m['lr']:.2e}  grad {m['grad_norm']:.3f}  {m['tokens_per_s']:.0f} tok/s", flush=True)

    start = trainer.step
    trainer.fit(data, out, on_step=log, show_progress=not args.quiet)
    final = os.path.join(out, "final")
    if trainer.step != start or not os.path.lexists(final):
        trainer.export(final, dtype=args.export_dtype, overwrite=True)
    say(f"trained model ({trainer.step} steps): {final}")
    return 0


def register(subparsers):
    p = subparsers.add_parser("train", allow_abbrev=False, help="train or fine-tune on text / JSONL files",
                              description="Train a Mixtral on plain-text or JSONL ({\"text\": ...}) files.")
    p.add_argument("--data", nargs="+", required=True, help="text or .jsonl files")
    p.add_argument("--out", required=True, help="run directory: checkpoints/ and final/")
    p.add_argument("--config", default="tiny", help=f"{', '.join(NAMED_CONFIGS)}, a checkpoint, or a config JSON "
                                                    "file (default: tiny)")
    p.add_argument("--init-from", help="start from these weights (HF directory or mixtral-jax checkpoint)")
    p.add_argument("--skip-sequences", type=int, default=0,
                   help="start the data stream at this sequence (to continue an --init-from model on unseen data; "
                        "past one epoch, later epochs continue in their own orders)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: steps/10, at most 100)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    p.add_argument("--z-loss", type=float, default=0.0, help="router z-loss coefficient (e.g. 1e-3; 0: off)")
    p.add_argument("--mesh", help="device mesh such as data=2,expert=4 (default: one device)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: only at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-dtype", choices=["float32", "bfloat16"], help="dtype of OUT/final (default: float32)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_train)
