"""One process of a multi-process run (started by tests/test_multihost.py through the environment)."""

import sys

import numpy as np


def main(ckpt: str, mesh_spec: str, out: str) -> None:
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from mixtral_jax.sharding.distributed import initialize

    initialize()
    import mixtral_jax

    model = mixtral_jax.load_hf(ckpt, mesh=mesh_spec, show_progress=False)
    mesh = model.runtime.mesh
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    tokens = jax.make_array_from_callback(tokens.shape, batch, lambda idx: tokens[idx])
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    if jax.process_index() == 0:
        np.save(out, np.asarray(logits))
    print(f"process {jax.process_index()}/{jax.process_count()}: {len(jax.local_devices())} local of "
          f"{len(jax.devices())} devices, done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
