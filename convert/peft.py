"""Hugging Face PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) <-> our adapters.

    lora, arrays = read_peft("my-adapter", model.config)     # or: load_peft(model, "my-adapter")
    save_peft(model, "out/adapter")                           # PeftModel.from_pretrained(hf_model, "out/adapter")

Written with the key names PEFT gives Mixtral's modules as the Hub checkpoints (and transformers 4) name
them, which every PEFT version reads; PEFT >= 0.19 converts the per-expert keys onto transformers 5's
fused experts when it loads them (`peft.utils.transformers_weight_conversion`):

    base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.lora_{A,B}.weight

`lora_A.weight` is (r, in) and `lora_B.weight` (out, r) over the flattened PyTorch `[out, in]` weight, so
ours are their transposes, reshaped to our layouts (`mixtral_jax.model.lora`). Read: those keys, and what
PEFT saves from transformers 5 with `target_parameters` on the fused experts (one LoRA on `gate_up_proj`,
whose A serves w1 and w3 and whose B rows split w1 then w3, and one on `down_proj`; experts stacked along
the rank: A (E * r, in), B (out, r * E) with the expert fastest). The update is `alpha / r` times the
low-rank product, as PEFT without rsLoRA; variants we do not compute (DoRA, rsLoRA, per-module ranks or
alphas, biases, other modules) are refused with the reason, never dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model import lora as lora_lib
from mixtral_jax.model.lora import LoRAConfig

from .atomic import atomic_directory, write_durably
from .export_hf import _header
from .safetensors_file import SafetensorsFile

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
_ATTENTION_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])"
                            r"(?:\.default)?\.weight")
_EXPERT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])"
                         r"\.lora_([AB])(?:\.default)?\.weight")
_FUSED_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])"
                        r"(?:\.default)?\.weight")


# ------------------------------------------------------------------------------------ our layout <-> PEFT
def _to_peft(target: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (non-expert or one expert's) adapter: ours (a, b) -> PEFT's (lora_A (r, in), lora_B (out, r))."""
    r = a.shape[-1]
    if target == "o_proj":  # a (h, x, r), b (r, d)
        return a.reshape(-1, r).T, b.T
    return a.T, b.reshape(r, -1).T  # a (in, r); b (r, out...)


def _from_peft(target: str, lora_a: np.ndarray, lora_b: np.ndarray, config: MixtralConfig):
    r = lora_a.shape[0]
    if target == "o_proj":
        return lora_a.T.reshape(config.n_heads, config.head_dim, r), lora_b.T
    if target in ("q_proj", "k_proj", "v_proj"):
        heads = config.n_heads if target == "q_proj" else config.n_kv_heads
        return lora_a.T, lora_b.T.reshape(r, heads, config.head_dim)
    return lora_a.T, lora_b.T  # one expert: (in, r), (r, out)


def _peft_shapes(target: str, config: MixtralConfig, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    d, f = config.dim, config.hidden_dim
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    in_out = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "w1": (d, f), "w3": (d, f), "w2": (f, d)}[target]
    return (r, in_out[0]), (in_out[1], r)


# -------------------------------------------------------------------------------------------------- write
def peft_config(lora: LoRAConfig, base_model: str | None = None) -> dict:
    """The `adapter_config.json` PEFT writes for this adapter (LoRA on a causal LM, no variants)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets), "target_parameters": None, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
    }


def peft_tensors(config: MixtralConfig, lora: LoRAConfig, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our adapter arrays (`lora.adapter_arrays`) as PEFT's `{key: tensor}`, float32."""
    out = {}
    for i in range(config.n_layers):
        for target in lora.targets:
            a = np.asarray(arrays[lora_lib.adapter_name(i, target, "a")], np.float32)
            b = np.asarray(arrays[lora_lib.adapter_name(i, target, "b")], np.float32)
            if target in lora_lib.ATTENTION_TARGETS:
                keys = [(f"{PREFIX}{i}.self_attn.{target}", a, b)]
            else:
                keys = [(f"{PREFIX}{i}.block_sparse_moe.experts.{e}.{target}", a[e], b[e]) for e in range(a.shape[0])]
            for key, ea, eb in keys:
                lora_a, lora_b = _to_peft(target, ea, eb)
                out[f"{key}.lora_A.weight"] = np.ascontiguousarray(lora_a)
                out[f"{key}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    return out


def save_peft(model, path, *, base_model: str | None = None, overwrite: bool = False) -> str:
    """Write `model`'s adapters as a PEFT adapter directory at `path` (atomically)."""
    lora = lora_lib.lora_config(model)
    if lora is None:
        raise CheckpointError("the model has no LoRA adapters to save")
    return write_peft(path, model.config, lora, lora_lib.adapter_arrays(model), base_model=base_model,
                      overwrite=overwrite)


def write_peft(path, config: MixtralConfig, lora: LoRAConfig, arrays: Mapping[str, np.ndarray], *,
               base_model: str | None = None, overwrite: bool = False) -> str:
    tensors = peft_tensors(config, lora, arrays)
    path = os.fspath(path)

    def is_complete(p):
        return os.path.isfile(os.path.join(p, CONFIG_FILE)) and os.path.isfile(os.path.join(p, WEIGHTS_FILE))

    with atomic_directory(path, overwrite=overwrite, is_complete=is_complete, what="adapter") as tmp:
        os.makedirs(tmp)
        header, _ = _header([(k, v.dtype, v.shape) for k, v in tensors.items()])
        with open(os.path.join(tmp, WEIGHTS_FILE), "wb") as f:
            f.write(header)
            for v in tensors.values():
                f.write(v.tobytes())
            f.flush()
            os.fsync(f.fileno())
        write_durably(os.path.join(tmp, CONFIG_FILE), json.dumps(peft_config(lora, base_model), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------- read
def _check_config(cfg: dict, path: str) -> None:
    def refuse(what):
        raise CheckpointError(f"{path}: {what}; only plain LoRA (alpha / r scaling) is supported")

    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        refuse(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(flag):
            refuse(f"{flag} is set")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        refuse("the adapter trains biases")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pattern):
            refuse(f"{pattern} gives some modules their own rank or alpha")
    if cfg.get("modules_to_save"):
        refuse(f"modules_to_save {cfg['modules_to_save']} holds fully trained modules")


def read_peft(path, config: MixtralConfig) -> tuple[LoRAConfig, dict[str, np.ndarray]]:
    """(LoRAConfig, our adapter arrays by `lora.adapter_name`) from a PEFT adapter directory for `config`."""
    path = os.fspath(path)
    cfg_file, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(cfg_file) or not os.path.isfile(weights):
        raise CheckpointError(f"{path} is not a PEFT adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(open(cfg_file, encoding="utf-8").read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from None
    _check_config(cfg, path)
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    st = SafetensorsFile(weights)
    found: dict[tuple, np.ndarray] = {}  # (layer, target, expert or None, "A"/"B") -> tensor
    fused: dict[tuple, np.ndarray] = {}  # (layer, depth, "A"/"B") -> tensor
    for key in st.keys():
        if m := _ATTENTION_KEY.fullmatch(key):
            found[int(m[1]), m[2], None, m[3]] = st.get(key)
        elif m := _EXPERT_KEY.fullmatch(key):
            found[int(m[1]), m[3], int(m[2]), m[4]] = st.get(key)
        elif m := _FUSED_KEY.fullmatch(key):
            fused[int(m[1]), m[2].count("base_layer"), m[3]] = st.get(key)
        else:
            raise CheckpointError(f"{weights}: tensor {key} is not a LoRA adapter of Mixtral's attention or experts")
    for layer, depth in sorted({k[:2] for k in fused}):
        _split_fused(fused, layer, depth, rank, config, found, weights)
    if not found:
        raise CheckpointError(f"{weights} holds no adapters")
    targets = tuple(sorted({k[1] for k in found}))
    lora = LoRAConfig(rank, alpha, float(cfg.get("lora_dropout") or 0.0), targets)
    arrays = {}
    for i in range(config.n_layers):
        for target in lora.targets:
            experts = [None] if target in lora_lib.ATTENTION_TARGETS else list(range(config.n_experts))
            pairs = []
            for e in experts:
                try:
                    lora_a, lora_b = found.pop((i, target, e, "A")), found.pop((i, target, e, "B"))
                except KeyError:
                    where = f"layer {i} {target}" + (f" expert {e}" if e is not None else "")
                    raise CheckpointError(f"{weights}: no lora_A/lora_B for {where}") from None
                want_a, want_b = _peft_shapes(target, config, rank)
                if lora_a.shape != want_a or lora_b.shape != want_b:
                    raise CheckpointError(f"{weights}: layer {i} {target}: lora_A {list(lora_a.shape)}, lora_B "
                                          f"{list(lora_b.shape)}; expected {list(want_a)} and {list(want_b)} for "
                                          f"this model at r={rank}")
                pairs.append(_from_peft(target, np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32),
                                        config))
            a, b = pairs[0] if experts == [None] else (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
            arrays[lora_lib.adapter_name(i, target, "a")], arrays[lora_lib.adapter_name(i, target, "b")] = a, b
    if found:
        layer = sorted(found)[0][0]
        raise CheckpointError(f"{weights}: adapters for layer {layer}, which this model ({config.n_layers} layers) "
                              "lacks")
    return lora, arrays


def _split_fused(fused, layer, depth, rank, config, found, weights) -> None:
    """transformers 5's fused experts -> per-expert (lora_A, lora_B) in PEFT's v4 layout, into `found`."""
    if (layer, depth, "A") not in fused:
        return
    lora_a, lora_b = fused.pop((layer, depth, "A")), fused.pop((layer, depth, "B"), None)
    if lora_b is None:
        raise CheckpointError(f"{weights}: layer {layer}: a fused experts lora_A without its lora_B")
    e, d, f = config.n_experts, config.dim, config.hidden_dim
    if lora_a.shape == (e * rank, d) and lora_b.shape == (2 * f, rank * e):  # gate_up_proj: w1 rows, then w3
        a = lora_a.reshape(e, rank, d)
        b = lora_b.reshape(2 * f, rank, e)
        for x in range(e):
            found[layer, "w1", x, "A"] = found[layer, "w3", x, "A"] = a[x]
            found[layer, "w1", x, "B"], found[layer, "w3", x, "B"] = b[:f, :, x], b[f:, :, x]
    elif lora_a.shape == (e * rank, f) and lora_b.shape == (d, rank * e):  # down_proj
        a, b = lora_a.reshape(e, rank, f), lora_b.reshape(d, rank, e)
        for x in range(e):
            found[layer, "w2", x, "A"], found[layer, "w2", x, "B"] = a[x], b[:, :, x]
    else:
        raise CheckpointError(f"{weights}: layer {layer}: fused experts adapter of shapes {list(lora_a.shape)} / "
                              f"{list(lora_b.shape)} fits neither gate_up_proj nor down_proj at r={rank}")


def load_peft(model, path):
    """Attach the PEFT adapter at `path` to `model` (in place; laid out on its mesh); returns the model."""
    lora, arrays = read_peft(path, model.config)
    return lora_lib.add_adapters(model, lora, arrays)
