"""Training and fine-tuning: next-token loss + router losses, optax, Orbax training checkpoints, export.

    tc = TrainConfig(steps=1000, batch_size=8, seq_len=512, lr=3e-4, warmup_steps=50)
    data = PackedDataset.from_files(["corpus.jsonl"], tc.seq_len, seed=tc.seed)
    trainer = Trainer(Mixtral(config, rngs=nnx.Rngs(tc.seed)), tc)      # or a loaded checkpoint
    trainer.fit(data, out_dir="run1")                                   # resumes if run1 has checkpoints
    trainer.export("run1/final")                                        # mixtral_jax.load("run1/final")

- Loss (`loss_terms`): mean next-token cross-entropy over every position that has a next token (as
  transformers' `labels=input_ids`), plus `aux_loss_coef` (default: the model config's
  `router_aux_loss_coef`) times the Switch load-balancing loss over all layers and tokens
  (`mixtral_jax.load_balancing_loss`, equal to transformers'), plus `z_loss_coef` times the ST-MoE router
  z-loss `mean(logsumexp(router_logits)^2)`.
- Optimizer: gradient clipping by global norm, then AdamW (no decay on 1-D norm scales) under a linear
  warm-up + cosine schedule to `min_lr_ratio * lr`. Gradient accumulation runs the micro-batches of a
  step in one jitted `lax.scan` and averages their gradients: the update equals one big batch's.
- The parameters are a flat `{name: array}` dict (the names of `mixtral_jax.param_specs`); the jitted step
  rebuilds the `Mixtral` from them, so on a mesh (`TrainConfig.mesh`, via `shard_model`) parameters and
  optimizer state keep the rules' shardings, the batch is split over `data`, and the MoE runs
  expert-parallel.
- Training checkpoints go through `orbax.checkpoint.CheckpointManager` at `OUT/checkpoints/` (local or a
  `gs://` URL): one step folder per save (`step_NNNNNNNN/`, with `state/`, the Orbax PyTree of parameters
  and optimizer state, and `train/metadata`, the step, data position, model and training config),
  `keep_checkpoints` of them kept (`max_to_keep`), written asynchronously while the next steps run. Orbax
  commits a step only when every process has written its shards (a rename locally, `commit_success.txt`
  on GCS), and lists only committed steps, so resuming takes the newest complete step and ignores a
  half-written one. The data stream is a pure function of its position (`mixtral_jax.training.data`) and
  the step is deterministic, so a resumed run equals the uninterrupted one.
- `Trainer.export(path)` writes the parameters in the converter's checkpoint format
  (`mixtral_jax.convert.orbax_io`), which `mixtral_jax.load(path)` reads.
- LoRA (`TrainConfig.lora`, a `mixtral_jax.model.lora.LoRAConfig`): the model gets adapters (fresh ones
  unless it has them) and only they are trained: `params` holds the adapters, the base (float or int8) is
  a frozen argument of the step, so gradients, optimizer state and checkpoints are the adapters' alone.
  Resuming needs the same base model (its config and a fingerprint are in the checkpoint's metadata).
  `export` then writes a PEFT adapter (`mixtral_jax.convert.peft`), or with `merge=True` the merged model.
- A batch is tokens (b, t), or (tokens, loss mask) for chat data (`ChatDataset`): the cross-entropy is
  the mean over the positions the mask marks as targets (the assistants' tokens), each micro-batch's own.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixtral_jax.config import MixtralConfig, as_dtype
from mixtral_jax.convert import orbax_io, paths
from mixtral_jax.convert import peft as peft_io
from mixtral_jax.errors import ConfigError
from mixtral_jax.model import lora as lora_lib
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.moe import load_balancing_loss
from mixtral_jax.model.params import model_arrays, param_specs
from mixtral_jax.model.placement import merge_adapters, shard_model
from mixtral_jax.progress import progress
from mixtral_jax.sharding import DEFAULT_RULES, FSDP_RULES, Rule, activation_spec
from mixtral_jax.training.data import PackedDataset

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM, TRAIN_ITEM = "state", "train"  # the CheckpointManager's items in each step folder


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run decides besides the model and the data."""

    steps: int = 100
    batch_size: int = 8           # sequences per optimizer step (all micro-batches together)
    seq_len: int = 256
    lr: float = 3e-4              # peak learning rate
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1     # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0        # 0 disables clipping
    grad_accum: int = 1           # micro-batches per step; batch_size must divide by it
    aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef
    z_loss_coef: float = 0.0      # router z-loss (ST-MoE); 0 disables it
    seed: int = 0                 # parameter init and data order
    mesh: str | None = None       # e.g. "data=2,expert=4"; None trains on one device
    fsdp: bool = False            # on a mesh, also split every weight's model dimension over `data`
    remat: bool = False           # recompute each layer's activations in the backward pass (long sequences)
    save_every: int = 0           # steps between checkpoints; 0 saves only at the end
    keep_checkpoints: int = 2     # the CheckpointManager's max_to_keep
    async_checkpoints: bool = True  # saves run in the background while the next steps train
    lora: lora_lib.LoRAConfig | None = None  # train only LoRA adapters (the base frozen); None: every weight

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 (one token and its successor), got {self.seq_len}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"lr must be positive and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        for name in ("weight_decay", "clip_norm", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise ConfigError(f"aux_loss_coef must not be negative, got {self.aux_loss_coef}")
        if isinstance(self.lora, Mapping):  # as `to_dict` writes it
            object.__setattr__(self, "lora", lora_lib.LoRAConfig.from_dict(self.lora))
        if self.lora is not None and not isinstance(self.lora, lora_lib.LoRAConfig):
            raise ConfigError(f"lora must be a LoRAConfig or None, got {self.lora!r}")
        if self.lora is not None and self.lora.dropout and set(self.lora.targets) & set(lora_lib.EXPERT_TARGETS):
            raise ConfigError("LoRA dropout applies to the attention targets only (q_proj k_proj v_proj "
                              "o_proj): PEFT refuses lora_dropout on Mixtral's fused experts too, since "
                              "lora_B(lora_A(dropout(x))) cannot share x with the base there; set dropout=0 "
                              "or leave w1 w2 w3 out of the targets")

    def check_model(self, config: MixtralConfig):
        if self.seq_len > config.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the model's context of {config.max_seq_len} tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ loss
def loss_terms(model: Mixtral, tokens: jax.Array, aux_loss_coef: float, z_loss_coef: float = 0.0,
               loss_mask: jax.Array | None = None, dropout_key: jax.Array | None = None):
    """tokens (b, t) -> (total loss, {"loss", "ce", "aux", "z"}); every position predicts the next, or
    with `loss_mask` (b, t) only the positions it marks (1: this token is a target). `dropout_key`: the
    LoRA adapters' dropout (none: no dropout)."""
    logits, router_logits = model(tokens, return_router_logits=True,
                                  lora_dropout_key=dropout_key)  # (b, t, v), (l, b, t, e)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (b, t - 1)
    if loss_mask is None:
        ce = jnp.mean(nll)
    else:
        weight = loss_mask[:, 1:].astype(jnp.float32)
        ce = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    n_layers, b, t, e = router_logits.shape
    flat = router_logits.reshape(n_layers, b * t, e).astype(jnp.float32)
    aux = load_balancing_loss(flat, model.config.top_k)
    z = jnp.mean(jax.nn.logsumexp(flat, axis=-1) ** 2)
    total = ce + aux_loss_coef * aux + z_loss_coef * z
    return total, {"loss": total, "ce": ce, "aux": aux, "z": z}


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    def decay_mask(params):  # no weight decay on the 1-D norm scales
        return {k: v.ndim >= 2 for k, v in params.items()}

    adamw = optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw) if tc.clip_norm > 0 else adamw


# ------------------------------------------------------------------------------------------------ step
@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
    """The pure pieces of a step: parameters (flat dict) -> model, loss, and one optimizer update.

    Holds no arrays (the variables are abstract templates that carry only metadata). Two steps that
    compute the same thing are equal (same model structure, training config up to checkpointing, loss
    coefficient and shardings), so `jax.jit` (`_run_step`, with the step static) compiles once for
    every trainer of the same model, config and shardings."""

    graphdef: Any
    templates: tuple                 # (path, name, abstract variable) per parameter, trained and frozen
    tc: TrainConfig
    aux_loss_coef: float
    param_shardings: tuple = ()      # ((name, sharding), ...): where the step's outputs live
    opt_shardings: Any = None        # the optimizer state's shardings (a pytree), or None

    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.tc)

    @functools.cached_property
    def schedule(self) -> optax.Schedule:
        return make_schedule(self.tc)

    def _key(self):
        # what does not change the computation (checkpoint cadence, the mesh spec string) is not part of it
        tc = dataclasses.replace(self.tc, save_every=0, keep_checkpoints=1, async_checkpoints=True, mesh=None)
        return (self.graphdef, tc, self.aux_loss_coef, self.param_shardings,
                tuple(jax.tree.leaves(self.opt_shardings)), jax.tree.structure(self.opt_shardings))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, TrainStep) and self._key() == other._key()

    def model(self, params: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array] | None = None) -> Mixtral:
        """The model of the trained `params` and the `frozen` rest (LoRA's base; {} in full training)."""
        values = {**(frozen or {}), **params}
        state = nnx.from_flat_state([(path, var.replace(values[name])) for path, name, var in self.templates])
        model = nnx.merge(self.graphdef, state)
        model.remat = self.tc.remat
        return model

    def loss(self, params, tokens, frozen=None, loss_mask=None, dropout_key=None):
        return loss_terms(self.model(params, frozen), tokens, self.aux_loss_coef, self.tc.z_loss_coef, loss_mask,
                          dropout_key)

    def __call__(self, params, opt_state, batch, frozen=None, dropout_key=None):
        """batch (grad_accum, micro_batch, seq_len), or a (tokens, loss mask) pair of those -> new params,
        new opt state, metrics. `frozen`: parameters that are inputs, not trained (LoRA's base);
        `dropout_key`: this step's LoRA dropout key (see `Trainer.train_step`)."""
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)

        def micro(carry, indexed):
            i, micro_batch = indexed
            tokens, mask = micro_batch if isinstance(micro_batch, tuple) else (micro_batch, None)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            (_, metrics), grads = grad_fn(params, tokens, frozen, mask, key)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), dict.fromkeys(("loss", "ce", "aux", "z"), jnp.float32(0)))
        n = jax.tree.leaves(batch)[0].shape[0]
        (grads, metrics), _ = jax.lax.scan(micro, zeros, (jnp.arange(n), batch))
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = {k: v / n for k, v in metrics.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if self.param_shardings:  # outputs stay where the inputs were (the next step then reuses this compile)
            params = jax.lax.with_sharding_constraint(params, dict(self.param_shardings))
        if self.opt_shardings is not None:
            opt_state = jax.lax.with_sharding_constraint(opt_state, self.opt_shardings)
        return params, opt_state, metrics


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def run_step(step: TrainStep, params, opt_state, batch, frozen=None, dropout_key=None):
    """One jitted step; equal `TrainStep`s share one compile (the step is a static argument). `frozen`
    (LoRA's base weights) is read, never donated."""
    return step(params, opt_state, batch, frozen, dropout_key)


@functools.partial(jax.jit, static_argnums=0)
def _target_nll(step: TrainStep, params, frozen, tokens, mask):
    """(sum of the targets' negative log-likelihoods, number of targets) of one batch."""
    logits = step.model(params, frozen)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight)


def batch_sharding(mesh, tc: TrainConfig, rules: Mapping[str, Rule] = DEFAULT_RULES) -> NamedSharding:
    """Batches (grad_accum, micro_batch, seq_len): micro-batches split over the rules' `batch` axes, as far
    as they divide (`activation_spec`)."""
    shape = (tc.grad_accum, tc.batch_size // tc.grad_accum, tc.seq_len)
    return NamedSharding(mesh, activation_spec(shape, (None, "batch", None), mesh, rules))


# --------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the parameters, the optimizer state and the step; `fit` runs the loop, `save`/`restore`
    the training checkpoints, `export` the trained model."""

    def __init__(self, model: Mixtral, tc: TrainConfig):
        tc.check_model(model.config)
        if tc.lora is not None and lora_lib.lora_config(model) != tc.lora:  # fresh adapters (b = 0)
            lora_lib.add_adapters(model, tc.lora, seed=tc.seed)
        elif tc.lora is None and lora_lib.lora_config(model) is not None:
            raise ConfigError("the model carries LoRA adapters: pass TrainConfig(lora=...) to train them, or merge "
                              "them first (mixtral_jax.model.placement.merge_adapters) to train every weight")
        if tc.lora is None and model.runtime.quantize is not None:
            raise ConfigError("int8 weights cannot be trained; train LoRA adapters on them (TrainConfig(lora=...))")
        if tc.mesh is not None:
            model = shard_model(model, tc.mesh, rules=FSDP_RULES if tc.fsdp else DEFAULT_RULES)
        self.tc, self.config, self.runtime = tc, model.config, model.runtime
        self.mesh = model.runtime.mesh
        aux_loss_coef = model.config.router_aux_loss_coef if tc.aux_loss_coef is None else tc.aux_loss_coef
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("the model holds non-parameter state; training expects parameters only")
        flat = nnx.to_flat_state(state)
        values = {".".join(map(str, path)): var.get_value() for path, var in flat}
        trained = {".".join(map(str, path)) for path, var in flat
                   if tc.lora is None or isinstance(var, lora_lib.LoRAParam)}
        self.params: dict[str, jax.Array] = {k: v for k, v in values.items() if k in trained}
        self.frozen: dict[str, jax.Array] = {k: v for k, v in values.items() if k not in trained}
        templates = tuple((path, ".".join(map(str, path)),
                           var.replace(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype)))
                          for path, var in flat)
        step_fn = TrainStep(graphdef, templates, tc, aux_loss_coef)
        self.optimizer, self.schedule = step_fn.optimizer, step_fn.schedule
        self.opt_state = jax.jit(self.optimizer.init)(self.params)
        if self.mesh is not None:  # the step counters come out on one device: replicate them over the mesh
            replicated = NamedSharding(self.mesh, P())
            self.opt_state = jax.tree.map(
                lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), self.opt_state)
        # committed to their devices, as the step's outputs are: the second step then reuses the first's compile
        self.params = {k: jax.device_put(v, v.sharding) for k, v in self.params.items()}
        self.opt_state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), self.opt_state)
        self.step = 0
        self.data_position = 0  # stream items (sequences) consumed
        self._managers: dict[str, Any] = {}  # run directory -> its CheckpointManager
        self._batch_sharding = self._make_batch_sharding()
        self.step_fn = dataclasses.replace(
            step_fn, param_shardings=tuple((k, v.sharding) for k, v in self.params.items()),
            opt_shardings=jax.tree.map(lambda x: x.sharding, self.opt_state))

    @property
    def aux_loss_coef(self) -> float:
        return self.step_fn.aux_loss_coef

    def model(self, params: Mapping[str, jax.Array] | None = None) -> Mixtral:
        """The `Mixtral` with these parameters (default: the current ones)."""
        return self.step_fn.model(self.params if params is None else params, self.frozen)

    def loss(self, params, tokens, loss_mask=None):
        """(total loss, metrics) of tokens (b, t) under `params` (a flat dict like `self.params`)."""
        return self.step_fn.loss(params, tokens, self.frozen, loss_mask)

    def evaluate(self, data, batch_size: int | None = None) -> float:
        """Mean cross-entropy per target token over every row of `data` (a `PackedDataset`: every next
        token; a `ChatDataset`: the assistants' tokens), in its stored order: a held-out loss."""
        batch_size = batch_size or self.tc.batch_size
        rows = np.arange(len(data))
        total, count = 0.0, 0.0
        for start in range(0, len(rows), batch_size):
            ids = rows[start:start + batch_size]
            if hasattr(data, "mask"):
                tokens, mask = data.tokens[ids], data.mask[ids]
            else:
                tokens = data.tokens.reshape(len(data), data.seq_len)[ids]
                mask = np.ones_like(tokens)
            s, n = _target_nll(self.step_fn, self.params, self.frozen or None, jnp.asarray(tokens), jnp.asarray(mask))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def _make_batch_sharding(self):
        return None if self.mesh is None else batch_sharding(self.mesh, self.tc)

    def train_step(self, tokens) -> dict[str, float]:
        """One optimizer step on tokens (batch_size, seq_len), or a (tokens, loss mask) pair; returns the
        metrics as floats."""
        tc = self.tc

        def put(x):
            x = np.asarray(x, np.int32).reshape(tc.grad_accum, tc.batch_size // tc.grad_accum, -1)
            return jax.device_put(x, self._batch_sharding) if self._batch_sharding is not None else jnp.asarray(x)

        batch = tuple(put(x) for x in tokens) if isinstance(tokens, tuple) else put(tokens)
        # LoRA dropout: a key per step from the seed and the step number (a resumed run draws what it would have)
        key = (jax.random.fold_in(jax.random.PRNGKey(tc.seed), self.step)
               if tc.lora is not None and tc.lora.dropout else None)
        self.params, self.opt_state, metrics = run_step(self.step_fn, self.params, self.opt_state, batch,
                                                        self.frozen or None, key)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["lr"] = float(self.schedule(self.step))  # the rate this step's update used
        self.step += 1
        self.data_position += tc.batch_size
        return metrics

    # ---- the loop
    def fit(self, data: PackedDataset, out_dir: str | None = None, *, stop_at: int | None = None,
            on_step: Callable[[int, dict], None] | None = None, show_progress: bool = False) -> list[dict]:
        """Train from `self.step` to `tc.steps` (or `stop_at`), saving to `out_dir` every `save_every`
        steps and at the end. Returns the metrics of every step run here."""
        tc = self.tc
        if data.seq_len != tc.seq_len:
            raise ConfigError(f"the data is packed into {data.seq_len}-token sequences, the config says {tc.seq_len}")
        last = min(tc.steps, stop_at) if stop_at is not None else tc.steps
        history = []
        tokens_per_step = tc.batch_size * tc.seq_len
        with progress(total=last - self.step, description="training", unit="steps", enabled=show_progress) as bar:
            while self.step < last:
                t0 = time.perf_counter()
                metrics = self.train_step(data.batch(self.data_position, tc.batch_size))
                metrics["tokens_per_s"] = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                history.append(metrics)
                bar.advance(1, description=f"step {self.step} loss {metrics['loss']:.3f} aux {metrics['aux']:.3f} "
                                           f"{metrics['tokens_per_s']:.0f} tok/s")
                if on_step is not None:
                    on_step(self.step, metrics)
                if out_dir is not None and tc.save_every and self.step % tc.save_every == 0 and self.step < last:
                    self.save(out_dir)
        if out_dir is not None and history:
            self.save(out_dir)
        if out_dir is not None:
            self.wait_until_saved()
        return history

    # ---- training checkpoints
    def _tree(self) -> dict:
        leaves = jax.tree.leaves(self.opt_state)
        return {"params": orbax_io.nest(self.params), "opt": {str(i): x for i, x in enumerate(leaves)}}

    def _manager(self, out_dir):
        key = paths.normalize(out_dir)
        if key not in self._managers:
            self._managers[key] = checkpoint_manager(key, self.tc.keep_checkpoints, self.tc.async_checkpoints)
        return self._managers[key]

    def save(self, out_dir) -> str:
        """Start saving this step under `out_dir/checkpoints/` (in the background with `async_checkpoints`:
        the device arrays are copied to host first, so the next steps may run and donate them); the
        manager then drops all but the newest `keep_checkpoints`. Returns the step folder."""
        import orbax.checkpoint as ocp  # slow to import: only where a training checkpoint is written

        manager = self._manager(out_dir)
        final = step_path(out_dir, self.step)
        if self.step in manager.all_steps():
            return final
        meta = {"step": self.step, "data_position": self.data_position, "train_config": self.tc.to_dict(),
                "model_config": self.config.to_dict(), "base_fingerprint": self.base_fingerprint(),
                "param_dtype": np.dtype(self.runtime.param_dtype).name,
                "saved": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        manager.save(self.step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(self._tree()),
                                                           TRAIN_ITEM: ocp.args.JsonSave(meta)}))
        return final

    def wait_until_saved(self):
        """Block until every save started here is committed (re-raises a failed one)."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self):
        self.wait_until_saved()
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()

    def restore(self, path):
        """Load parameters, optimizer state, step and data position from a training checkpoint (a step
        folder `OUT/checkpoints/step_NNNNNNNN`), straight into this trainer's shardings."""
        import orbax.checkpoint as ocp

        path = paths.normalize(path)
        meta = read_train_state(path)
        if meta.get("base_fingerprint", self.base_fingerprint()) != self.base_fingerprint():
            raise ValueError(f"{path} trained adapters on another base model (fingerprint "
                             f"{meta['base_fingerprint']}, this one {self.base_fingerprint()}); resume on the same "
                             "base (--init-from)")
        manager = checkpoint_manager(paths.dirname(paths.dirname(path)), self.tc.keep_checkpoints, False,
                                     read_only=True)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._tree())
        try:
            tree = manager.restore(int(meta["step"]), args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract)}))[STATE_ITEM]
        except Exception as e:  # noqa: BLE001 - Orbax raises many types; ours is one line
            raise ValueError(f"{path}: cannot restore the training state (was it written for this model "
                             f"and optimizer?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:
            manager.close()
        self.params = orbax_io.flatten(tree["params"])
        treedef = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [tree["opt"][str(i)] for i in range(treedef.num_leaves)])
        self.step, self.data_position = int(meta["step"]), int(meta["data_position"])

    def restore_latest(self, out_dir) -> bool:
        checkpoints = list_checkpoints(out_dir)
        if not checkpoints:
            return False
        self.restore(checkpoints[-1])
        return True

    def base_fingerprint(self) -> str | None:
        """LoRA: a checksum of the frozen base (a few values of every weight), so a resumed run can tell it
        is on the same base; None in full training (the checkpoint holds every weight)."""
        if not self.frozen:
            return None
        total = 0.0
        for name in sorted(self.frozen):
            flat = self.frozen[name].reshape(-1)
            total += float(jnp.sum(flat[:: max(1, flat.size // 64)].astype(jnp.float32)) * (1 + len(name) % 7))
        return f"{total:.6e}"

    # ---- export
    def export(self, path: str, dtype=None, *, overwrite: bool = False, tokenizer: str | None = None,
               merge: bool = False) -> str:
        """The trained parameters as a mixtral-jax checkpoint (the converter's format and writer, optionally
        cast to `dtype`, e.g. "bfloat16"): `mixtral_jax.load(path)` reads it. `overwrite` replaces an
        earlier export (and nothing else) only once the new one is complete. `tokenizer` None: the one
        matching the vocabulary, as the converter records. A LoRA run writes its adapter in PEFT's format
        (`mixtral_jax.convert.peft`), or with `merge` the base with the adapters merged into it."""
        path = paths.normalize(path)
        if self.tc.lora is not None and not merge:
            arrays = {k: np.asarray(jax.device_get(v)) for k, v in self.params.items()}
            return peft_io.write_peft(path, self.config, self.tc.lora, arrays, overwrite=overwrite)
        if paths.exists(path) and not (overwrite and orbax_io.may_replace(path)):
            raise FileExistsError(f"export destination {path} already exists")
        source = model_arrays(merge_adapters(self.model())) if self.tc.lora is not None else self.params
        specs = param_specs(self.config, self.runtime)
        dtype = as_dtype(dtype) if dtype is not None else np.dtype(self.runtime.param_dtype)
        metadata = orbax_io.checkpoint_metadata(
            self.config, specs, dict.fromkeys(specs, dtype), tokenizer=tokenizer,
            source={"path": None, "format": "mixtral-jax train", "layout": f"trained for {self.step} steps",
                    "cast_to": np.dtype(dtype).name if dtype != self.runtime.param_dtype else None,
                    "train_config": self.tc.to_dict()})

        def host_array(name):
            return np.asarray(jax.device_get(source[name].astype(dtype)))

        pending = [orbax_io.PendingTensor(name, spec.logical_axes,
                                          int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(dtype).itemsize,
                                          functools.partial(host_array, name))
                   for name, spec in specs.items()]
        orbax_io.write_checkpoint(path, metadata, pending, overwrite=overwrite, overlap=False, what="export")
        return path


def checkpoint_manager(out_dir, keep: int = 2, async_save: bool = True, *, read_only: bool = False):
    """The `orbax.checkpoint.CheckpointManager` of run directory `out_dir` (local or a URL)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix="step", step_format_fixed_length=8, create=not read_only,
        read_only=read_only, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(paths.join(out_dir, CHECKPOINT_DIR), options=options,
                                 item_names=(STATE_ITEM, TRAIN_ITEM))


def step_path(out_dir, step: int) -> str:
    return paths.join(paths.normalize(out_dir), CHECKPOINT_DIR, f"step_{step:08d}")


def list_checkpoints(out_dir) -> list[str]:
    """Complete (committed) training checkpoints under `out_dir`, oldest first; Orbax skips a step that
    was still being written when its process died."""
    if not paths.is_dir(paths.join(out_dir, CHECKPOINT_DIR)):
        return []
    manager = checkpoint_manager(out_dir, read_only=True)
    try:
        return [step_path(out_dir, step) for step in sorted(manager.all_steps(read=True))]
    finally:
        manager.close()


def read_train_state(path) -> dict[str, Any]:
    """The `train` item of a step folder: step, data position, model and training config."""
    file = paths.join(path, TRAIN_ITEM, "metadata")
    try:
        return json.loads(paths.read_text(file))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {TRAIN_ITEM}/metadata)") from None
