"""Multi-host detection is never fooled: libtpu's warning sentences, an `salloc` shell or a one-task SLURM job
leave a process single; real worker lists and SLURM steps of several tasks join (jax.distributed recorded)."""

import pytest

from mixtral_jax.sharding import distributed

# what libtpu 0.0.42 writes into the environment of a process that loaded it on a machine without TPUs
LIBTPU_WARNING = ("WARNING: could not determine TPU worker number, please set env var `TPU_WORKER_ID` manually, "
                  "otherwise libtpu.so may not properly initialize.")
CLEARED = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "TPU_PROCESS_ADDRESSES",
           distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
           *distributed._SLURM_VARS)


@pytest.fixture
def calls(monkeypatch):
    """A machine without TPU chips and a clean environment; `jax.distributed.initialize` recorded, not run."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "tpu_chip_count", lambda: 0)
    recorded = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: recorded.append((a, k)))
    return recorded


def test_libtpu_warning_strings_are_not_a_tpu_vm(monkeypatch, calls):
    monkeypatch.setenv("TPU_WORKER_ID", LIBTPU_WARNING)
    monkeypatch.setenv("CLOUD_TPU_TASK_ID", LIBTPU_WARNING)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames or IP addresses")
    assert not distributed.on_cloud_tpu_vm() and distributed.detect_cluster() is None
    distributed.initialize()
    assert calls == []


@pytest.mark.parametrize("hosts,worker", [("t1v-n-0,t1v-n-1", "1"), ("10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", "0"),
                                          ("10.130.0.5:8470,10.130.0.6:8470", "1")])
def test_a_real_worker_list_joins_the_slice(monkeypatch, calls, hosts, worker):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    monkeypatch.setenv("TPU_WORKER_ID", worker)
    assert distributed.on_cloud_tpu_vm() and distributed.detect_cluster() == "tpu-env"
    distributed.initialize()
    first = hosts.split(",")[0].split(":")[0]
    assert calls == [((f"{first}:{distributed.TPU_COORDINATOR_PORT}", len(hosts.split(",")), int(worker)), {})]


@pytest.mark.parametrize("hosts,worker", [
    ("t1v-n-0", "0"),                      # one host: a single process
    ("t1v-n-0,t1v-n-1", "2"),              # worker outside the list
    ("t1v-n-0,t1v-n-1", LIBTPU_WARNING),   # id not a number
    ("t1v n 0,t1v-n-1", "0"),              # not host names
    ("host_a,host_b", "0"),
])
def test_incomplete_or_bogus_worker_values_stay_single(monkeypatch, calls, hosts, worker):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    monkeypatch.setenv("TPU_WORKER_ID", worker)
    assert distributed.detect_cluster() is None
    distributed.initialize()
    assert calls == []


def test_tpu_chips_hand_over_to_jax_detection(monkeypatch, calls):
    monkeypatch.setattr(distributed, "tpu_chip_count", lambda: 4)
    assert distributed.on_cloud_tpu_vm() and distributed.detect_cluster() == "tpu"
    distributed.initialize()
    assert calls == [((), {})]


def test_slurm_joins_only_a_step_of_several_tasks(monkeypatch, calls):
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # an salloc shell: no step
    distributed.initialize()
    slurm = {"SLURM_STEP_NODELIST": "gpu-[1-2]", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    distributed.initialize()  # one task
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detect_cluster() == "slurm"
    distributed.initialize()
    assert calls == [((), {})]


def test_explicit_settings_win_and_bad_ones_are_one_line(monkeypatch, calls):
    monkeypatch.setenv("TPU_WORKER_ID", LIBTPU_WARNING)
    distributed.initialize("127.0.0.1:1234", 2, 1)
    assert calls[0][0] == ("127.0.0.1:1234", 2, 1)
    with pytest.raises(ValueError, match=r"process id 2 is outside \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match="needs a coordinator address"):
        distributed.initialize()


@pytest.mark.parametrize("value,ok", [("t1v-n-3a0b-w-0", True), ("10.0.0.1", True), ("fe80::1", True),
                                      ("[fe80::1]", True), ("node.example.internal", True), ("h:8470", True),
                                      ("", False), ("a b", False), ("-x", False), ("h:port", False),
                                      (LIBTPU_WARNING, False)])
def test_is_host(value, ok):
    assert distributed.is_host(value) is ok
