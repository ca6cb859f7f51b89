"""`mixtral-jax train`: train (or fine-tune) a Mixtral on text / JSONL files, with resumable checkpoints.

    mixtral-jax train --data corpus.jsonl --out run1 --config demo --steps 2000 --batch 16 --seq-len 256
    mixtral-jax train --data corpus.jsonl --out run1 --resume          # continue after an interruption
    mixtral-jax train --data chats.jsonl --out lora1 --init-from BASE --lora 16   # LoRA on attention + experts

Writes `OUT/checkpoints/step_N/` (training state, through Orbax's CheckpointManager: the newest
`--max-to-keep` kept, saved while training goes on) and, at the end, `OUT/final/` (the trained model in the
converter's format: `mixtral-jax generate --checkpoint OUT/final`). OUT may be a `gs://` URL.

With `--lora RANK` only LoRA adapters train (the `--init-from` base stays frozen, int8 with `--quantize int8`);
checkpoints hold the adapters and their optimizer state, and `OUT/final/` is a PEFT adapter
(`adapter_config.json` + `adapter_model.safetensors`), or the merged model with `--merge`. Chat data
(`{"messages": [...]}` lines) trains on the assistants' tokens only.
"""

from __future__ import annotations

import os
import sys

from flax import nnx

from mixtral_jax.cli.model_flags import NAMED_CONFIGS, model_config
from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.convert import paths
from mixtral_jax.errors import ConfigError
from mixtral_jax.loading.checkpoint import load_checkpoint
from mixtral_jax.model.lora import ALL_TARGETS, LoRAConfig
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.training.data import load_dataset
from mixtral_jax.training.trainer import TrainConfig, Trainer, list_checkpoints, read_train_state


def lora_config(args) -> LoRAConfig | None:
    if not args.lora:
        if args.lora_targets or args.lora_alpha is not None or args.lora_dropout or args.merge:
            raise ConfigError("--lora-targets, --lora-alpha, --lora-dropout and --merge need --lora RANK")
        return None
    return LoRAConfig(rank=args.lora, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora,
                      dropout=args.lora_dropout, targets=tuple(args.lora_targets or ALL_TARGETS))


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                       warmup_steps=args.warmup if args.warmup is not None else min(args.steps // 10, 100),
                       grad_accum=args.grad_accum, z_loss_coef=args.z_loss, seed=args.seed, mesh=args.mesh,
                       save_every=args.save_every, weight_decay=args.weight_decay, clip_norm=args.clip,
                       keep_checkpoints=args.max_to_keep, lora=lora_config(args))


def run_train(args) -> int:
    tc = train_config(args)
    for p in args.data:  # fail on a missing file before anything slow
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p}")
    out = paths.normalize(args.out)  # a gs:// URL stays one
    existing = list_checkpoints(out)
    if existing and not args.resume:
        raise FileExistsError(f"{out} already holds training checkpoints; pass --resume to continue, or another --out")
    if paths.exists(paths.join(out, "final")) and not args.resume:
        raise FileExistsError(f"{out}/final already exists; choose another --out")
    if existing:  # the architecture comes from the checkpoint
        config = MixtralConfig.from_dict(read_train_state(existing[-1])["model_config"])
    else:
        config = model_config(args.config)
    tc.check_model(config)
    say = (lambda m: print(m, file=sys.stderr)) if not args.quiet else (lambda m: None)
    say(f"tokenizing {len(args.data)} file(s) ...")
    data = load_dataset(args.data, tc.seq_len, seed=tc.seed)
    kind = "conversations" if hasattr(data, "mask") else "sequences"
    say(f"{len(data)} {kind} of {tc.seq_len} tokens ({len(data) * tc.seq_len:,} tokens)")
    if args.quantize and tc.lora is None:
        raise ConfigError("--quantize int8 trains LoRA adapters on an int8 base: add --lora RANK")
    if args.init_from and (not existing or tc.lora is not None):  # LoRA: the frozen base is not in checkpoints
        model = load_checkpoint(args.init_from, dtype="float32", quantize=args.quantize)  # the Trainer shards it
        if existing and model.config != config:
            raise ConfigError(f"--init-from {args.init_from} is not the base model {out} was trained on")
        config = model.config
        tc.check_model(config)
    else:
        if tc.lora is not None and not args.init_from:
            say("warning: --lora without --init-from adapts a random base model")
        model = Mixtral(config, RuntimeConfig(quantize=args.quantize), rngs=nnx.Rngs(tc.seed))
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
    n_frozen = sum(int(v.size) for v in trainer.frozen.values())
    say(f"model: {(n_params + n_frozen) / 1e6:.2f}M parameters, {config.n_layers} layers, "
        f"{config.n_experts} experts top-{config.top_k}"
        + (f"; training LoRA rank {tc.lora.rank} on {','.join(tc.lora.targets)}: {n_params / 1e6:.3f}M "
           f"adapter parameters" if tc.lora is not None else ""))

    def log(step, m):
        if not args.quiet and (step % args.log_every == 0 or step == tc.steps):
            print(f"step {step:6d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  aux {m['aux']:.4f}  "
                  f"lr {m['lr']:.2e}  grad {m['grad_norm']:.3f}  {m['tokens_per_s']:.0f} tok/s", flush=True)

    held_out = load_dataset(args.eval_data, tc.seq_len, seed=tc.seed) if args.eval_data else None
    if held_out is not None:
        print(f"held-out loss before: {trainer.evaluate(held_out):.4f} ({len(held_out)} rows)", flush=True)
    start = trainer.step
    try:
        trainer.fit(data, out, on_step=log, show_progress=not args.quiet)
    finally:
        trainer.close()  # the last save is committed before the export or an error's exit
    if held_out is not None:
        print(f"held-out loss after {trainer.step} steps: {trainer.evaluate(held_out):.4f}", flush=True)
    final = paths.join(out, "final")
    if trainer.step != start or not paths.exists(final):
        trainer.export(final, dtype=args.export_dtype, overwrite=True, merge=args.merge)
    what = "LoRA adapter (PEFT format)" if tc.lora is not None and not args.merge else "trained model"
    say(f"{what} ({trainer.step} steps): {final}")
    return 0


def register(subparsers):
    p = subparsers.add_parser("train", allow_abbrev=False, help="train or fine-tune on text / JSONL files",
                              description="Train a Mixtral on plain-text or JSONL ({\"text\": ...}) files.")
    p.add_argument("--data", nargs="+", required=True, help="text or .jsonl files ({\"text\"} or chat {\"messages\"})")
    p.add_argument("--eval-data", nargs="+", help="held-out files of the same kind: their loss before and after")
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
    p.add_argument("--max-to-keep", type=int, default=2, help="training checkpoints kept (the newest; default 2)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-dtype", choices=["float32", "bfloat16"], help="dtype of OUT/final (default: float32)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train LoRA adapters of this rank only (the base frozen); OUT/final is a PEFT adapter")
    p.add_argument("--lora-targets", nargs="+", choices=list(ALL_TARGETS), metavar="MODULE",
                   help=f"modules to adapt (default: all of {' '.join(ALL_TARGETS)})")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha: the update is scaled by alpha/rank (default 2*rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the adapters' input while training (PEFT's lora_dropout; attention targets only)")
    p.add_argument("--quantize", choices=["int8"], help="with --lora: an int8 base (QLoRA-style; adapters float)")
    p.add_argument("--merge", action="store_true", help="with --lora: OUT/final is the base with the adapters merged")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_train)
