#!/usr/bin/env bash
# The Dockerfile mirrors scripts/setup.sh instead of copying it (no Docker engine runs here, so
# this is what can be checked without building the image): it runs setup.sh for the Debian
# packages and the build, names none of setup.sh's packages itself (a copied list drifts: a
# package once went missing that way), builds the CUDA backend and the NCCL plane when CUDA=1
# (the default), and its ENTRYPOINT is the binary setup.sh builds.
#   tests/test_dockerfile.sh SOURCE_DIR
set -uo pipefail
src=$1
df=$src/Dockerfile
fail=0
check() { if ! eval "$1"; then echo "test_dockerfile: FAILED: $2"; fail=1; fi; }
check "grep -q 'bash scripts/setup.sh' '$df'" "the Dockerfile does not run scripts/setup.sh"
packages=$(sed -n '/^PACKAGES=(/,/^)/p' "$src/scripts/setup.sh" | grep -v '^PACKAGES=(\|^)' | tr -s ' \n' '\n' | grep -v '^$')
check "[[ \$(echo '$packages' | wc -l) -gt 10 ]]" "could not read setup.sh's PACKAGES list"
for p in $packages; do
  check "! grep -Eq '(^|[[:space:]])$p([[:space:]]|$)' '$df'" "the Dockerfile names setup.sh's package $p itself"
done
check "grep -q '^ARG CUDA=1' '$df' && grep -q 'SWITCHT5_CUDA=ON -DSWITCHT5_NCCL=ON' '$df'" "no CUDA build by default"
check "grep -q 'FROM debian:12' '$df'" "not the Debian 12 that setup.sh targets"
check "grep -q 'ENTRYPOINT \[\"/src/build/switcht5\"\]' '$df'" "the entrypoint is not setup.sh's build/switcht5"
exit $fail
