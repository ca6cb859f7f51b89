"""Cloud TPU slices by their Cloud names (`v5e-8`, `v4-32`, `v5p-128`, ...) and NVIDIA GPU hosts (`h100-8`,
`h200-1`, `a100-8`, multi-host `h100-16`, ...): chips, HBM, bandwidth, peak.

`Topology.devices()` asks libtpu (installed by `jax[tpu]`; no TPU needed) for the slice's devices, so a
program can be compiled ahead of time for a slice this machine does not have (see `mixtral_jax.planning.planner`).
The Cloud name counts TensorCores for v4 and v5p (two per chip, fused as one "megacore" device) and
chips for v5e and v6e: v4-32 is 16 chips, v5e-8 is 8.

Chip figures are the published per-chip ones (Cloud TPU system architecture pages): HBM, HBM bandwidth,
dense bf16 peak. The HBM is what XLA:TPU says is available when it refuses a program (30.75 GiB of v4's
nominal 32; 15.75 of 16; 95.74 GiB of 95; 31.25 of 32 for v6e): serving plans size pages to it, so a
nominal figure over it makes XLA refuse the first size.

GPU hosts are described the same way by the CUDA PJRT plugin (`jax-cuda12-plugin` and `ptxas` from
`nvidia-cuda-nvcc-cu12`, the `gpu-plan` extra; no GPU needed) from one of XLA's GpuTargetConfigProto files
(`gpu_specs/`, copied from openxla/xla's `xla/backends/gpu/target_config/specs`): "h100-16" is 2 hosts of
8 H100s. A GPU's HBM and bandwidth are the spec file's (`device_memory_size`, what the driver reports, all
of it: JAX's allocator takes 75% unless `XLA_PYTHON_CLIENT_MEM_FRACTION` says otherwise); peaks are
NVIDIA's dense bf16 figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
from importlib import resources

from jax.experimental import topologies

try:  # private: the CUDA plugin's library versions (None without the plugin), to ask whether cuDNN loads
    from jax._src.lib import cuda_versions
except ImportError:
    cuda_versions = None

from mixtral_jax.errors import TopologyError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    hbm_bandwidth: float   # bytes/s
    peak_flops: float      # dense bf16 FLOP/s


CHIPS = {
    "v4": Chip("TPU v4", int(30.75 * GIB), 1.2e12, 275e12),
    "v5e": Chip("TPU v5e", int(15.75 * GIB), 8.19e11, 197e12),
    "v5p": Chip("TPU v5p", int(95.74 * GIB), 2.765e12, 459e12),
    "v6e": Chip("TPU v6e", int(31.25 * GIB), 1.64e12, 918e12),
}
H100 = Chip("NVIDIA H100 SXM 80GB", 80 * 10**9, 3.35e12, 989e12)

# generation -> (libtpu prefix, megacore chips, {Cloud size: chip grid})
_GENERATIONS = {
    "v4": ("v4", True, {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
                        512: "4x8x8"}),
    "v5e": ("v5e", False, {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}),
    "v5p": ("v5", True, {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
                         512: "4x8x8"}),
    "v6e": ("v6e", False, {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str               # the Cloud name, e.g. "v5e-8"
    chip: Chip
    libtpu_name: str        # e.g. "v5e:2x4"
    megacore: bool

    backend = "tpu"

    @property
    def chips(self) -> int:
        return math.prod(int(n) for n in self.libtpu_name.split(":")[1].split("x"))

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        # v5e/v6e hosts of 8-chip slices hold all 8 (one host); larger slices and v4/v5p use 2x2x1 hosts
        return (2, 4, 1) if not self.megacore and self.chips == 8 else (2, 2, 1)

    @property
    def hosts(self) -> int:
        return max(1, self.chips // math.prod(self.chips_per_host_bounds))

    def devices(self) -> list:
        """The slice's devices, one per chip, from libtpu's topology description (nothing is allocated)."""
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several processes may load libtpu
        kwargs = dict(platform="tpu", topology_name=self.libtpu_name, chips_per_host_bounds=self.chips_per_host_bounds)
        if self.megacore:
            kwargs["chip_config_name"] = "megacore"
        try:
            with _quiet_stderr():  # libtpu logs its search for a real TPU on this machine
                topology = topologies.get_topology_desc(**kwargs)
        except Exception as e:  # noqa: BLE001 - libtpu raises runtime errors of several kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TopologyError(f"cannot describe {self.name} ({self.libtpu_name}): {first}; is jax[tpu] "
                                f"installed at this jax version?") from None
        devices = list(topology.devices)
        if len(devices) != self.chips:
            raise TopologyError(f"libtpu describes {self.name} with {len(devices)} devices, expected {self.chips}")
        return devices


TOPOLOGIES: dict[str, Topology] = {
    f"{gen}-{size}": Topology(f"{gen}-{size}", CHIPS[gen], f"{prefix}:{grid}", megacore)
    for gen, (prefix, megacore, sizes) in _GENERATIONS.items() for size, grid in sizes.items()
}


# ------------------------------------------------------------------------------------------- GPUs
# generation -> (spec file in gpu_specs/, dense bf16 peak FLOP/s)
_GPU_SPECS = {
    "h100": ("h100_sxm.txtpb", 989e12),
    "h200": ("h200.txtpb", 989e12),
    "a100": ("a100_sxm_80.txtpb", 312e12),
}
GPUS_PER_HOST = 8
_GPU_SIZES = (1, 8, 16, 32)  # one GPU, one 8-GPU host, 2 and 4 hosts


def gpu_target_config(spec_file: str) -> str:
    """The text of a GpuTargetConfigProto shipped in `mixtral_jax/planning/gpu_specs/`."""
    return resources.files("mixtral_jax.planning").joinpath("gpu_specs", spec_file).read_text()


def _spec_field(text: str, field: str) -> str:
    m = re.search(rf"^\s*{field}:\s*\"?([^\"\n]+)\"?\s*$", text, re.M)
    if not m:
        raise TopologyError(f"GPU target config without {field}")
    return m[1]


@functools.cache
def gpu_chip(generation: str) -> Chip:
    spec_file, peak = _GPU_SPECS[generation]
    text = gpu_target_config(spec_file)
    return Chip(_spec_field(text, "device_description_str"), int(_spec_field(text, "device_memory_size")),
                float(_spec_field(text, "memory_bandwidth")), peak)


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """`gpus` NVIDIA GPUs of one generation, `GPUS_PER_HOST` a host (all of them when fewer)."""

    name: str               # e.g. "h100-16"
    generation: str         # a key of _GPU_SPECS
    gpus: int

    backend = "gpu"

    @property
    def chip(self) -> Chip:
        return gpu_chip(self.generation)

    @property
    def chips(self) -> int:
        return self.gpus

    @property
    def hosts(self) -> int:
        return max(1, self.gpus // GPUS_PER_HOST)

    @property
    def topology_string(self) -> str:
        """slices x hosts x GPUs per host, as the CUDA plugin's topology description takes it."""
        return f"1x{self.hosts}x{self.gpus // self.hosts}"

    def devices(self) -> list:
        """The hosts' GPUs, from the CUDA plugin's description of the target config (nothing is allocated)."""
        try:
            with _quiet_stderr():  # the plugin logs that this machine has no CUDA driver
                topology = topologies.get_topology_desc(
                    platform="cuda", target_config=gpu_target_config(_GPU_SPECS[self.generation][0]),
                    topology=self.topology_string)
        except Exception as e:  # noqa: BLE001 - a missing plugin and XLA errors arrive as several kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TopologyError(f"cannot describe {self.name} ({self.topology_string} {self.chip.name}): {first}; "
                                f"is the gpu-plan extra (jax-cuda12-plugin at this jax version, "
                                f"nvidia-cuda-nvcc-cu12) installed?") from None
        devices = list(topology.devices)
        if len(devices) != self.chips:
            raise TopologyError(f"the CUDA plugin describes {self.name} with {len(devices)} devices, "
                                f"expected {self.chips}")
        return devices


GPU_TOPOLOGIES: dict[str, GpuTopology] = {
    f"{gen}-{n}": GpuTopology(f"{gen}-{n}", gen, n) for gen in _GPU_SPECS for n in _GPU_SIZES
}


def gpu_plugin_available() -> bool:
    """Whether the CUDA PJRT plugin (the gpu-plan extra) is importable here."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no `jax_plugins` namespace at all: no plugin of any kind installed
        return False


def cudnn_available() -> bool:
    """Whether the CUDA plugin finds the cuDNN library (the `nvidia-cudnn-cu12` wheel): XLA:GPU then compiles
    `jax.nn.dot_product_attention(implementation="cudnn")` to cuDNN's fused flash attention, as on a GPU."""
    if not gpu_plugin_available():
        return False
    try:
        with _quiet_stderr():
            return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
    except Exception:  # noqa: BLE001 - "cuDNN not found" is a RuntimeError; an old plugin may lack the call
        return False


def get_topology(name: str) -> Topology | GpuTopology:
    """`'v5e-8'` or `'h100-8'` -> its topology; an unknown name is a one-line error listing the valid ones."""
    key = name.strip().lower().replace("v5litepod", "v5e").replace("v6e-lite", "v6e")
    if key in GPU_TOPOLOGIES:
        return GPU_TOPOLOGIES[key]
    if key not in TOPOLOGIES:
        kind = "GPU" if key[:1] in ("a", "h") else "TPU"
        raise TopologyError(f"unknown {kind} topology {name!r}; choose one of {', '.join(TOPOLOGIES)}; or GPU hosts "
                            f"{', '.join(GPU_TOPOLOGIES)}")
    return TOPOLOGIES[key]


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the duration (C++ logging bypasses Python's sys.stderr)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
