#!/usr/bin/env bash
# Start this node's mixtral-jax process of a multi-node run, torchrun-style: run it on every node.
#
#   node 0:  launch/multinode.sh --nnodes 2 --node-rank 0 --coordinator 10.0.0.1:29500 \
#                generate "The mixture of experts" --checkpoint /shared/mixtral-orbax --mesh data=2,expert=8
#   node 1:  launch/multinode.sh --nnodes 2 --node-rank 1 --coordinator 10.0.0.1:29500 \
#                generate "The mixture of experts" --checkpoint /shared/mixtral-orbax --mesh data=2,expert=8
#
# Why: jax.distributed needs, on every node, the coordinator's address (node 0's host and a port that
# the other nodes can reach), the number of processes and this process's id. This script turns
# torchrun-style flags into the MIXTRAL_JAX_* variables that `mixtral-jax` reads, then runs the same
# mixtral-jax command as every other node. One process per node drives all of the node's GPUs, so the
# mesh covers nodes x GPUs-per-node devices. Everything after the flags reaches mixtral-jax unchanged.
# MIXTRAL_JAX names the program (default: mixtral-jax on PATH).
set -euo pipefail

die() { echo "multinode.sh: error: $*" >&2; exit 2; }
usage="usage: launch/multinode.sh --nnodes N --node-rank R --coordinator HOST:PORT [--] SUBCOMMAND [ARGS...]"

nnodes="" rank="" coordinator=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes|--node-rank|--coordinator)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in --nnodes) nnodes=$2 ;; --node-rank) rank=$2 ;; *) coordinator=$2 ;; esac
      shift 2 ;;
    --nnodes=*) nnodes=${1#*=}; shift ;;
    --node-rank=*) rank=${1#*=}; shift ;;
    --coordinator=*) coordinator=${1#*=}; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$nnodes' ($usage)"
if ! [[ $rank =~ ^(0|[1-9][0-9]*)$ ]] || (( rank >= nnodes )); then
  die "--node-rank must be in [0, $nnodes), got '$rank'"
fi
if ! [[ $coordinator =~ ^[A-Za-z0-9._-]+:([1-9][0-9]{0,4})$ ]] || (( BASH_REMATCH[1] > 65535 )); then
  die "--coordinator must be HOST:PORT (node 0's address and a free port), got '$coordinator'"
fi
[[ $# -gt 0 ]] || die "give the mixtral-jax subcommand to run ($usage)"

export MIXTRAL_JAX_COORDINATOR=$coordinator MIXTRAL_JAX_NUM_PROCESSES=$nnodes MIXTRAL_JAX_PROCESS_ID=$rank
exec "${MIXTRAL_JAX:-mixtral-jax}" "$@"
