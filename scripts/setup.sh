#!/usr/bin/env bash
# Installs what cocos-manager needs on a Debian machine: system packages (when run as root,
# or through sudo) and a virtual environment with the project and its dev tools.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
say() { printf 'setup: %s\n' "$*"; }

packages=(python3 python3-venv python3-dev gcc qemu-system-x86 ovmf busybox-static cpio
          zstd xz-utils openssl systemd sudo procps strace)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    "${sudo[@]}" apt-get update >/dev/null
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
  }
fi

stamp=$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)
if [ ! -f "$stamp" ]; then
  say "creating virtual environment $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  say "installing cocos-manager and its dev tools"
  "$venv/bin/pip" install -q -e "$root[dev]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
say "ready: $venv/bin/cocos-manager"
