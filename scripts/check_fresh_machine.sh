#!/usr/bin/env bash
# The README's two commands on a fresh Debian 12, as a new user runs them.
#
#   scripts/check_fresh_machine.sh [--keep]        (root; run from anywhere inside the checkout)
#
# 1. host-tools   installs debootstrap on this machine if it is missing;
# 2. debootstrap  makes a fresh Debian 12 root: `debootstrap --variant=minbase bookworm`, from the
#                 Debian mirror named in this machine's apt sources;
# 3. configure    lets the root reach the package registries the way this machine does: the
#                 apt sources (and the keyrings they name), apt's Acquire settings (proxies),
#                 /etc/pip.conf, the CA files named by SSL_CERT_FILE, SSL_CERT_DIR, PIP_CERT,
#                 REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE, /usr/local/share/ca-certificates (a
#                 TLS-inspecting proxy's CA), resolv.conf and hosts; bind-mounts /proc, /sys and
#                 /dev (recursive, as slaves, so nothing done inside propagates out) and this
#                 machine's ccache directory (ccache cannot change what gets built);
# 4. copy         copies the committed tree (`git archive HEAD`: uncommitted changes are NOT
#                 tested) to /root/src/main and ../shared to /root/src/shared inside the root;
# 5. setup, test  runs the commands of the README's "The two commands" block, exactly as
#                 written there, from /root/src/main, with chroot and a clean environment
#                 (only HOME, PATH, LANG, TERM, CI, the proxy variables and the CA/pip variables
#                 above are passed in).
# Then it unmounts and removes everything it made, also on failure, Ctrl-C or SIGTERM; a root
# left behind by a run that was killed with -9 is removed by the next run. Each phase prints its
# duration; a failure exits non-zero naming the phase, with the last lines of its log. The logs
# stay in $SWITCHT5_FRESH_LOGS (default build/fresh-machine/ in the checkout). --keep keeps the
# root (unmounted) for a post-mortem instead of removing it.
set -euo pipefail

keep=0
case "${1:-}" in
  --keep) keep=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "check_fresh_machine: unknown argument '$1' (expected --keep or nothing)" >&2; exit 2 ;;
esac
[[ $(id -u) -eq 0 ]] || { echo "check_fresh_machine: needs root (debootstrap, mount, chroot)" >&2; exit 2; }

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$(cd "$CHECKOUT/.." && pwd)/shared
LOGS=${SWITCHT5_FRESH_LOGS:-$CHECKOUT/build/fresh-machine}
SUITE=bookworm
STATE_DIR=/var/tmp            # roots live here as switcht5-fresh.XXXXXX (+ .pid while in use)
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log

ts() { date +%s; }
say() { echo "[fresh-machine] $*"; }

# ---- cleanup: kill what runs inside, unmount deepest first, remove -----------------------------
mounts_under() {  # mount points at or below $1, deepest first (mountinfo field 5)
  awk -v r="$1" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
cleanup_root() {  # $1 = root directory; $2 = 1 to keep the (unmounted) files
  local root=$1 keep_files=${2:-0} p m tries
  [[ -n "$root" && "$root" == "$STATE_DIR"/switcht5-fresh.* && -d "$root" ]] || return 0
  for p in /proc/[0-9]*; do
    [[ "$(readlink "$p/root" 2>/dev/null)" == "$root" ]] && kill -9 "${p#/proc/}" 2>/dev/null || true
  done
  for tries in 1 2 3; do
    while read -r m; do [[ -n "$m" ]] && umount "$m" 2>/dev/null || true; done < <(mounts_under "$root")
    [[ -z "$(mounts_under "$root")" ]] && break
    sleep 1
  done
  while read -r m; do [[ -n "$m" ]] && umount -l "$m" 2>/dev/null || true; done < <(mounts_under "$root")
  if [[ -n "$(mounts_under "$root")" ]]; then
    echo "check_fresh_machine: could not unmount everything under $root; not removing it:" >&2
    mounts_under "$root" >&2
    return 1
  fi
  rm -f "$root.pid"
  if ((keep_files)); then say "kept $root (unmounted)"; else rm -rf --one-file-system "$root"; fi
}

# Roots of earlier runs whose process is gone (kill -9, power loss).
for old in "$STATE_DIR"/switcht5-fresh.*; do
  [[ -d "$old" ]] || continue
  pid=$(cat "$old.pid" 2>/dev/null || echo "")
  if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
    say "removing the root of an earlier run that did not finish: $old"
    cleanup_root "$old" 0 || true
  fi
done

ROOT=$(mktemp -d "$STATE_DIR/switcht5-fresh.XXXXXX")
# mktemp -d makes the directory 0700, and debootstrap keeps that mode for the root's "/": inside
# the chroot no user but root could then reach /bin/sh (munge's postinst, `su munge -s /bin/sh`,
# failed with "Permission denied"). A real Debian's / is 0755.
chmod 0755 "$ROOT"
echo $$ > "$ROOT.pid"
PHASE=none
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if ((rc != 0)); then
    echo
    echo "check_fresh_machine: FAILED in phase '$PHASE' (exit $rc); last lines of $LOGS/$PHASE.log:" >&2
    [[ -f "$LOGS/$PHASE.log" ]] && tail -n 40 "$LOGS/$PHASE.log" >&2
  fi
  local t0; t0=$(ts)
  cleanup_root "$ROOT" "$keep" || rc=1
  say "phase cleanup: $(( $(ts) - t0 )) s"
  exit "$rc"
}
trap on_exit EXIT
trap 'echo; say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# run_phase NAME STREAM CMD...: runs CMD with its output in $LOGS/NAME.log (and on the console
# when STREAM is 1); prints the phase's duration.
run_phase() {
  local name=$1 stream=$2 t0 rc; shift 2
  PHASE=$name
  t0=$(ts)
  say "phase $name: started"
  if ((stream)); then
    set +e; "$@" 2>&1 | tee "$LOGS/$name.log"; rc=${PIPESTATUS[0]}; set -e
  else
    set +e; "$@" > "$LOGS/$name.log" 2>&1; rc=$?; set -e
  fi
  ((rc == 0)) || exit "$rc"
  say "phase $name: ok ($(( $(ts) - t0 )) s)"
}

# ---- 1. host tools --------------------------------------------------------------------------
host_tools() {
  command -v debootstrap >/dev/null && return 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
}
run_phase host-tools 0 host_tools

# ---- 2. debootstrap -------------------------------------------------------------------------
# The Debian mirror of this machine's apt sources: the URI of the first source serving
# "$SUITE" (one-line .list format or deb822 .sources).
debian_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                         if ($(i + 1) == s) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; ok = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
          if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
        }
        if (ok && uri != "") { print uri; exit } }' "$f"
  done
}
MIRROR=$(debian_mirror | head -n 1)
[[ -n "$MIRROR" ]] || { PHASE=debootstrap; echo "no apt source for '$SUITE' in /etc/apt/sources.list*" > "$LOGS/debootstrap.log"; exit 1; }
say "mirror: $MIRROR; root: $ROOT"
run_phase debootstrap 0 debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR"

# ---- 3. configure ---------------------------------------------------------------------------
copy_in() {  # copy_in PATH: this machine's file or directory PATH to the same path in the root
  local src=$1
  [[ -e "$src" ]] || return 0
  mkdir -p "$ROOT$(dirname "$src")"
  if [[ -d "$src" ]]; then mkdir -p "$ROOT$src"; cp -rL "$src/." "$ROOT$src/"; else cp -L "$src" "$ROOT$src"; fi
}
CA_VARS=(SSL_CERT_FILE SSL_CERT_DIR PIP_CERT REQUESTS_CA_BUNDLE CURL_CA_BUNDLE)
configure_root() {
  local f v key
  # apt: the sources (replacing debootstrap's), the keyrings they name, Acquire settings
  rm -f "$ROOT/etc/apt/sources.list"
  copy_in /etc/apt/sources.list
  copy_in /etc/apt/sources.list.d
  copy_in /etc/apt/trusted.gpg
  copy_in /etc/apt/trusted.gpg.d
  copy_in /etc/apt/keyrings
  for key in $(grep -rhoE '(signed-by=|Signed-By:[[:space:]]*)[^] ]+' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null |
               sed -E 's/^(signed-by=|Signed-By:[[:space:]]*)//'); do
    [[ "$key" == /* && ! -e "$ROOT$key" ]] && copy_in "$key"
  done
  for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    [[ -f "$f" ]] && grep -q 'Acquire' "$f" && copy_in "$f"
  done
  # pip and TLS: the CA files the environment names, the local CAs, pip's config
  for v in "${CA_VARS[@]}"; do [[ -n "${!v:-}" ]] && copy_in "${!v}"; done
  copy_in /usr/local/share/ca-certificates
  copy_in /etc/pip.conf
  # name resolution
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  cp -L /etc/hosts "$ROOT/etc/hosts"
  # /proc, /sys, /dev as recursive slave binds
  for d in proc sys dev; do
    mkdir -p "$ROOT/$d"
    mount --rbind "/$d" "$ROOT/$d"
    mount --make-rslave "$ROOT/$d"
  done
  # this machine's ccache directory, where the root's ccache looks by default
  local cache=${CCACHE_DIR:-$HOME/.cache/ccache}
  mkdir -p "$cache" "$ROOT/root/.cache/ccache"
  mount --bind "$cache" "$ROOT/root/.cache/ccache"
  echo "mounted: $(mounts_under "$ROOT" | tr '\n' ' ')"
}
run_phase configure 0 configure_root

# ---- 4. copy --------------------------------------------------------------------------------
copy_tree() {
  mkdir -p "$ROOT/root/src/main"
  if [[ -n "$(git -C "$CHECKOUT" status --porcelain)" ]]; then
    echo "warning: the checkout has uncommitted changes; only HEAD ($(git -C "$CHECKOUT" rev-parse --short HEAD)) is tested"
  fi
  git -C "$CHECKOUT" archive --format=tar HEAD | tar -x -C "$ROOT/root/src/main"
  if [[ -d "$SHARED" ]]; then cp -a "$SHARED" "$ROOT/root/src/shared"; else echo "warning: no $SHARED"; fi
  du -sh "$ROOT/root/src/main" "$ROOT/root/src/shared" 2>/dev/null || true
}
run_phase copy 0 copy_tree
[[ -s "$LOGS/copy.log" ]] && grep '^warning' "$LOGS/copy.log" || true

# ---- 5. the README's two commands -----------------------------------------------------------
# The lines of the first ```sh block after the heading "## The two commands", comments removed.
mapfile -t README_CMDS < <(awk '/^## The two commands/ { h = 1; next }
  h && /^```sh/ { b = 1; next } b && /^```/ { exit }
  b { sub(/[ \t]*#.*/, ""); if ($0 != "") print }' "$ROOT/root/src/main/README.md")
((${#README_CMDS[@]} == 2)) || {
  PHASE=copy; echo "README.md: expected the two commands in the '## The two commands' block, found: ${README_CMDS[*]:-none}" >> "$LOGS/copy.log"; exit 1; }

CHROOT_ENV=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
            LANG=C.UTF-8 TERM=dumb "CI=${CI:-}")
for v in "${CA_VARS[@]}" http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY \
         PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
  [[ -n "${!v:-}" ]] && CHROOT_ENV+=("$v=${!v}")
done
in_root() {  # in_root COMMAND: runs the README's COMMAND in the checkout inside the root
  chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}" /bin/bash -c 'cd /root/src/main && '"$1" </dev/null
}
say "README commands: ${README_CMDS[0]} | ${README_CMDS[1]}"
run_phase setup 1 in_root "${README_CMDS[0]}"
run_phase test 1 in_root "${README_CMDS[1]}"
say "the README's two commands passed on a fresh Debian 12 ($SUITE, minbase)"
