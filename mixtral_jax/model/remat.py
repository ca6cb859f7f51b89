"""Rematerialisation that keeps to the backward pass's order."""

from __future__ import annotations

import jax


def remat_in_order(fn):
    """`jax.checkpoint(fn)` (keep fn's inputs, recompute its activations for the backward pass), pinned to its
    place in the backward pass, so that one call's activations are live at a time:

    - the recomputation cannot start before fn's output cotangent exists (the inputs and that cotangent go
      through one `optimization_barrier`): with `jax.checkpoint` XLA may schedule the recomputations of many
      layers ahead of their backward passes, their inputs all being known once the forward pass is done;
    - the gradients of fn's differentiated inputs come out of one barrier together: otherwise XLA may leave
      the weight gradients (LoRA's b: a rows x hidden cotangent each) for the end of the step and keep every
      layer's cotangents alive until then.

    Only the inputs being differentiated get a gradient (the others return zero), so a frozen base costs no
    weight gradients."""
    perturbed = []  # per call, which inputs are differentiated: known when `forward` is traced

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def forward(*args):
        perturbed[:] = [jax.tree.map(lambda p: p.perturbed, a) for a in args]
        values = jax.tree.map(lambda p: p.value, args)
        return fn(*values), values

    def backward(args, cotangent):
        cotangent = jax.tree.map(_instantiate, cotangent, is_leaf=_is_zero)
        args, cotangent = jax.lax.optimization_barrier((args, cotangent))
        flags = jax.tree.leaves(perturbed)
        leaves, tree = jax.tree.flatten(args)
        wanted = [i for i, f in enumerate(flags) if f]

        def of_wanted(*values):
            full = list(leaves)
            for i, v in zip(wanted, values, strict=True):
                full[i] = v
            return fn(*jax.tree.unflatten(tree, full))

        _, vjp = jax.vjp(of_wanted, *[leaves[i] for i in wanted])
        grads = jax.lax.optimization_barrier(vjp(cotangent))
        out = [None] * len(leaves)
        for i, g in zip(wanted, grads, strict=True):
            out[i] = g
        return tuple(jax.tree.unflatten(tree, out))

    run.defvjp(forward, backward, symbolic_zeros=True)
    return run


def _is_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


def _instantiate(x):
    return jax.numpy.zeros(x.shape, x.dtype) if _is_zero(x) else x
