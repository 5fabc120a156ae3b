#!/usr/bin/env bash
# The one place that launches MPI jobs, for users and for the test suite (tests/mpi):
#   scripts/mpirun.sh -np 4 build/switcht5 train --config configs/tiny.yaml --set parallel.data=4
# Every mpirun option passes through. With Open MPI it adds, only when needed:
#   --allow-run-as-root   when running as root (containers, CI);
#   --oversubscribe       when more ranks than cores are asked for (Open MPI refuses otherwise);
#   --bind-to none        when a rank runs more than one OpenMP thread and no --bind-to/--map-by
#                         was given (Open MPI binds each rank to a single core when np <= 2);
#   -x OMP_NUM_THREADS    exported to every rank; when unset it defaults to cores / ranks (>= 1)
#                         so that the ranks' OpenMP teams do not compete for the same cores.
# Environment: MPIEXEC (launcher, default mpirun from PATH; CMake passes the one FindMPI found),
# SWITCHT5_MPIRUN_FLAGS (extra launcher options, word-split), SWITCHT5_MPIRUN_DRYRUN=1 (print
# the command instead of running it).
#
# Containers: on this Debian 12 image Open MPI 4.1 needs nothing beyond the flags above. Where
# shared memory fails ("vader" / process_vm_readv / CMA errors, e.g. Docker without
# CAP_SYS_PTRACE), export OMPI_MCA_btl_vader_single_copy_mechanism=none; where it warns about
# missing network interfaces or OpenFabrics devices on a single machine, export
# OMPI_MCA_btl=self,vader (and OMPI_MCA_pml=ob1 if UCX complains). Open MPI reads OMPI_MCA_*
# from the environment, so these need no flag here.
set -euo pipefail

MPIEXEC=${MPIEXEC:-mpirun}
command -v "$MPIEXEC" >/dev/null || {
  echo "mpirun.sh: $MPIEXEC not found (Debian: apt-get install openmpi-bin libopenmpi-dev)" >&2
  exit 127
}

# Ranks asked for (-np N, -n N, --np N, -np=N); Open MPI's default is one per core.
cores=$(nproc)
if command -v lscpu >/dev/null; then
  physical=$(lscpu -p=Core,Socket 2>/dev/null | grep -v '^#' | sort -u | wc -l)
  ((physical > 0 && physical < cores)) && cores=$physical
fi
np=$cores
user_binding=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -np | -n | --np | -c) ((i + 1 < ${#args[@]})) && np=${args[i + 1]} ;;
    -np=* | --np=* | -n=*) np=${args[i]#*=} ;;
    --bind-to | --map-by | -bind-to | -map-by | --bind-to=* | --map-by=*) user_binding=1 ;;
  esac
  # The program and its arguments start at the first word that is not an option.
  [[ "${args[i]}" != -* && $i -gt 0 && "${args[i - 1]}" != -* ]] && break
done
[[ "$np" =~ ^[0-9]+$ && "$np" -ge 1 ]] || { echo "mpirun.sh: bad rank count '$np'" >&2; exit 2; }

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / np > 0 ? cores / np : 1))}

flags=()
if "$MPIEXEC" --version 2>&1 | grep -Eq "Open MPI|OpenRTE"; then
  [[ $(id -u) -eq 0 ]] && flags+=(--allow-run-as-root)
  ((np > cores)) && flags+=(--oversubscribe)
  ((OMP_NUM_THREADS > 1 && user_binding == 0)) && flags+=(--bind-to none)
  flags+=(-x OMP_NUM_THREADS)
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
flags+=(${SWITCHT5_MPIRUN_FLAGS:-})

if [[ "${SWITCHT5_MPIRUN_DRYRUN:-0}" == 1 ]]; then
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $MPIEXEC ${flags[*]} $*"
  exit 0
fi
exec "$MPIEXEC" "${flags[@]}" "$@"
