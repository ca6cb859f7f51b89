#!/usr/bin/env bash
# mixtral-jax on one machine with several GPUs: one process drives all of them (JAX single-process,
# multi-device), with the model sharded over a mesh of the local GPUs.
#
#   launch/gpu_single_host.sh generate "The mixture of experts" --checkpoint Mixtral-8x7B-v0.1 --mesh expert=8
#   launch/gpu_single_host.sh chat --checkpoint /data/mixtral-orbax            # mesh: expert=<number of GPUs>
#
# Why a script: a single process needs no coordinator, so any MIXTRAL_JAX_* variables left in the
# environment (from a multi-node shell) are removed; JAX_PLATFORMS defaults to cuda so a CPU-only jax
# fails loudly instead of quietly running on one CPU device; and without --mesh the experts are spread
# over all visible GPUs (expert=N; N must divide the 8 experts: 1, 2, 4 or 8 GPUs). See launch/README.md
# for which mesh fits. MIXTRAL_JAX names the program (default: mixtral-jax on PATH).
set -euo pipefail

die() { echo "gpu_single_host.sh: error: $*" >&2; exit 2; }
[[ $# -gt 0 ]] || die "usage: launch/gpu_single_host.sh SUBCOMMAND [ARGS...] (e.g. generate 'Hello' --mesh expert=8)"

unset MIXTRAL_JAX_COORDINATOR MIXTRAL_JAX_NUM_PROCESSES MIXTRAL_JAX_PROCESS_ID
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}

has_mesh=0
for arg in "$@"; do
  [[ $arg == --mesh || $arg == --mesh=* ]] && has_mesh=1
done

if (( ! has_mesh )); then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
  elif command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  else
    die "cannot count the GPUs (no nvidia-smi, no CUDA_VISIBLE_DEVICES); pass --mesh"
  fi
  (( gpus > 0 )) || die "no GPUs found; pass --mesh or check the driver (nvidia-smi -L)"
  set -- "$@" --mesh "expert=$gpus"
fi

exec "${MIXTRAL_JAX:-mixtral-jax}" "$@"
