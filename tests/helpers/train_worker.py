"""One process of a multi-process training run (started by tests/training/test_checkpoints.py).

argv: OUT STOP_AT RESULT. Trains the test's tiny model on mesh data=2,expert=4 (spanning every process)
into OUT, resuming from OUT's newest checkpoint if there is one, until step STOP_AT; process 0 then saves
every parameter (gathered from all processes) to RESULT (.npz).
"""

import sys

import numpy as np


def main(out: str, stop_at: str, result: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    from mixtral_jax.sharding.distributed import initialize

    initialize()
    from tests.training.test_checkpoints import MESH, make_data, make_trainer

    trainer = make_trainer(MESH)
    resumed = trainer.restore_latest(out)
    trainer.fit(make_data(), out, stop_at=int(stop_at))
    trainer.close()
    params = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in trainer.params.items()}
    if jax.process_index() == 0:
        np.savez(result, **params)
    print(f"process {jax.process_index()}/{jax.process_count()}: resumed={resumed} step={trainer.step}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
