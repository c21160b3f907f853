#!/usr/bin/env bash
# Extracts Debian bookworm-backports' upstream QEMU (10.x) into a private folder, so tests can
# check the confidential command lines against a QEMU that knows sev-snp-guest's upstream
# properties. Debian's own qemu-system-x86 (7.2) stays installed and is never replaced: the
# packages are downloaded with `apt-get download` and unpacked with `dpkg -x`, not installed.
#
# Usage: scripts/upstream-qemu.sh [DEST]   (default build/qemu-upstream; cached: a second run
# that finds DEST/usr/bin/qemu-system-x86_64 working does nothing). Prints the binary's path.
# Needs root (or sudo) only the first time, to add the bookworm-backports source to apt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/build/qemu-upstream}
say() { printf 'upstream-qemu: %s\n' "$*" >&2; }
run_qemu() {
  QEMU_MODULE_DIR="$dest/usr/lib/x86_64-linux-gnu/qemu" \
    LD_LIBRARY_PATH="$dest/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$dest/usr/bin/qemu-system-x86_64" -L "$dest/usr/share/qemu" "$@"
}

# One fetch at a time (a lock on this script, which every user can read): test workers
# (pytest-xdist) that start on a fresh clone all ask at once, and two fetches would fight over
# apt's lock and clobber each other's extraction.
exec 9<"${BASH_SOURCE[0]}"
flock 9

if [ -x "$dest/usr/bin/qemu-system-x86_64" ] && run_qemu -version >/dev/null 2>&1; then
  echo "$dest/usr/bin/qemu-system-x86_64"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The mirror bookworm itself comes from (deb822 `URIs:` or one-line `deb` entries).
  mirror=$(grep -rhsE '^[[:space:]]*(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ |
    grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
  if [ -z "$mirror" ]; then
    say "no Debian mirror in apt's sources: add bookworm-backports to apt by hand"
    exit 1
  fi
  say "adding bookworm-backports ($mirror) to apt's sources"
  printf 'deb %s bookworm-backports main\n' "${mirror%/}" |
    "${sudo[@]}" tee /etc/apt/sources.list.d/cocos-bookworm-backports.list >/dev/null
  "${sudo[@]}" apt-get update -qq >/dev/null
elif ! grep -q bookworm-backports <<<"$(apt-cache policy qemu-system-x86)"; then
  # (Not `apt-cache ... | grep -q`: grep's early exit fails the pipe under pipefail.)
  "${sudo[@]}" apt-get update -qq >/dev/null
fi

work=$(mktemp -d)
chmod 755 "$work"  # apt-get download runs as _apt where it can
trap 'rm -rf "$work"' EXIT
packages=(qemu-system-x86 qemu-system-common qemu-system-data)
say "downloading ${packages[*]} from bookworm-backports"
(cd "$work" && apt-get download -q -t bookworm-backports "${packages[@]}" >/dev/null)
rm -rf "$dest.partial"
mkdir -p "$dest.partial"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dest.partial"; done

# Libraries the backported binary needs that bookworm's own packages do not provide.
missing=$(QEMU_MODULE_DIR="$dest.partial/usr/lib/x86_64-linux-gnu/qemu" \
  ldd "$dest.partial/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}' || true)
if [ -n "$missing" ]; then
  say "libraries missing on this host: $missing"
  exit 1
fi
rm -rf "$dest"
mv "$dest.partial" "$dest"
run_qemu -version | head -n1 >&2
echo "$dest/usr/bin/qemu-system-x86_64"
