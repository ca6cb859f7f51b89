"""Device meshes from a plain spec string such as `expert=4,tensor=2` or `data=2,expert=-1`."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from .rules import MESH_AXES, ShardingError


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """`'data=2,expert=-1'` -> `{'data': 2, 'expert': 4, 'tensor': 1}` for 8 devices (-1: the rest)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ShardingError(f"bad mesh spec {spec!r}: expected AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ShardingError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ShardingError(f"bad mesh spec {spec!r}: size {value!r} of {name!r} is not an integer") from None
        if size == 0 or size < -1:
            raise ShardingError(f"bad mesh spec {spec!r}: size of {name!r} must be positive or -1")
        sizes[name] = size
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ShardingError(f"bad mesh spec {spec!r}: only one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % known:
            raise ShardingError(f"mesh {spec!r}: {n_devices} devices are not divisible by {known}")
        sizes[rest[0]] = n_devices // known
    full = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if math.prod(full.values()) != n_devices:
        raise ShardingError(
            f"mesh {spec!r} needs {math.prod(full.values())} devices but {n_devices} are available; "
            f"make the sizes multiply to {n_devices} or use -1 for one axis")
    return full


def make_mesh(spec: str | dict[str, int] | Mesh | None = None, devices=None) -> Mesh:
    """A `Mesh` with axes ('data', 'expert', 'tensor'). None puts every device on `data`."""
    if isinstance(spec, Mesh):
        return spec
    devices = list(devices if devices is not None else jax.devices())
    if spec is None:
        spec = "data=-1"
    sizes = parse_mesh_spec(spec, len(devices)) if isinstance(spec, str) else \
        parse_mesh_spec(",".join(f"{k}={v}" for k, v in spec.items()), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
