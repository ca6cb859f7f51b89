"""A model as the arguments of a jitted function: its graph static (hashed once), its state as flat leaves.

The sampler's and the engine's steps take a model this way (`split_flat` outside, `merge_flat` inside), and
so does `Mixtral.__call__` outside any trace (`forward`): run op by op, a forward pass of even the tiny test
model dispatched and compiled each of its hundreds of operations separately, 3-5x slower than one compiled
program (15.7 s against 2.8 s on an 8-device mesh)."""

from __future__ import annotations

import collections
import functools
import threading

import jax
from flax import nnx


class HashedOnce:
    """A static jit argument whose hash is computed once. jit hashes its static arguments on every call,
    and an nnx `GraphDef` hashes its whole module tree: 0.6 ms of each ~20 ms CPU decode step went there.
    `HashedOnce.of` hands out one wrapper per distinct graph, so jit's cache lookup is an identity check on
    every step; an equal graph from a later request is compared in full once, when it is wrapped (jit
    compared it in full on every step otherwise: 0.44 ms of a 9 ms step)."""

    _recent: collections.OrderedDict[int, list[HashedOnce]] = collections.OrderedDict()  # hash -> wrappers
    _KEEP = 16  # distinct graphs remembered (one per model a process samples from, in practice)
    _lock = threading.Lock()

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    @classmethod
    def of(cls, value) -> HashedOnce:
        """The wrapper handed out before for a graph equal to `value`, else a new one."""
        h = hash(value)
        with cls._lock:
            same = cls._recent.setdefault(h, [])
            cls._recent.move_to_end(h)
            for wrapper in same:
                if wrapper.value == value:
                    return wrapper
            same.append(cls(value))
            while len(cls._recent) > cls._KEEP:
                cls._recent.popitem(last=False)
            return same[-1]

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, HashedOnce) and self._hash == other._hash
                                 and self.value == other.value)

    @staticmethod
    def unwrap(value):
        return value.value if isinstance(value, HashedOnce) else value


def split_flat(model) -> tuple[HashedOnce, HashedOnce, list]:
    """(graph, state tree, state leaves) for a jitted function called once per decode step: the two static
    parts wrapped once (`HashedOnce.of`), the state flattened once (an nnx State flattens in Python on
    every call, ~70 us; a list in C++). `merge_flat` inside the jitted function undoes it."""
    graphdef, state = nnx.split(model)
    return HashedOnce.of(graphdef), *flat_state(state)


def flat_state(state) -> tuple[HashedOnce, list]:
    leaves, treedef = jax.tree.flatten(state)
    return HashedOnce.of(treedef), leaves


def merge_flat(graphdef, treedef, leaves):
    return nnx.merge(HashedOnce.unwrap(graphdef), jax.tree.unflatten(HashedOnce.unwrap(treedef), leaves))


def tracing(*trees) -> bool:
    """Whether any leaf of `trees` is a tracer: the caller is inside a jit, grad or vmap (which compiles or
    differentiates it already)."""
    return any(isinstance(leaf, jax.core.Tracer) for tree in trees for leaf in jax.tree.leaves(tree))


def forward(graphdef, state, inputs: tuple, static: tuple):
    """`model._forward(*inputs, *static)` of the model `nnx.split` gave as (graphdef, state), as one compiled
    program (cached per graph, shapes and `static`)."""
    return _forward(HashedOnce.of(graphdef), *flat_state(state), inputs, static)


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef", "static"))
def _forward(graphdef, treedef, leaves, inputs, static):
    return merge_flat(graphdef, treedef, leaves)._forward(*inputs, *static)
