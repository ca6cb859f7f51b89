"""One process of a multi-process training run (started by tests/training/test_checkpoints.py).

argv: OUT KILL_AT STOP_AT RESULT. Trains the test's tiny model on mesh data=2,expert=4 (spanning every process)
into OUT until step KILL_AT and drops that trainer (as if the job were killed there), printing the step
folders then on disk; a fresh trainer of another initialization then resumes from OUT's newest checkpoint
until step STOP_AT; process 0 then saves every parameter (gathered from all processes) to RESULT (.npz).
"""

import os
import sys

# the suite's XLA:CPU optimization level (tests/conftest.py): compiles faster, reorders no float arithmetic
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np  # noqa: E402


def main(out: str, kill_at: str, stop_at: str, result: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    from mixtral_jax.sharding.distributed import initialize

    initialize()
    from tests.training.test_checkpoints import MESH, make_data, make_trainer

    first = make_trainer(MESH)
    resumed = first.restore_latest(out)
    first.fit(make_data(), out, stop_at=int(kill_at))
    first.close()
    print(f"process {jax.process_index()}/{jax.process_count()}: resumed={resumed} step={first.step}", flush=True)
    del first
    multihost_utils.sync_global_devices("killed")
    folders = sorted(os.listdir(os.path.join(out, "checkpoints")))
    print(f"process {jax.process_index()}: folders={','.join(folders)}", flush=True)
    multihost_utils.sync_global_devices("listed")

    trainer = make_trainer(MESH, seed=99)  # another init: everything must come from the checkpoint
    resumed = trainer.restore_latest(out)
    trainer.fit(make_data(), out, stop_at=int(stop_at))
    trainer.close()
    params = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in trainer.params.items()}
    if jax.process_index() == 0:
        np.savez(result, **params)
    print(f"process {jax.process_index()}/{jax.process_count()}: resumed={resumed} step={trainer.step}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
