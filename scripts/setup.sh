#!/usr/bin/env bash
# Installs what cocos-manager needs on a Debian machine: system packages (when run as root,
# or through sudo) and a virtual environment with the project and its dev tools.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
say() { printf 'setup: %s\n' "$*"; }

# pip, without its "WARNING: Location '...' is ignored" lines: a pip configuration that names
# index or find-links locations which do not exist (common on build hosts) makes pip say so
# for every package, burying what matters. Everything else pip says, and its exit status,
# pass through.
pip_quietly() {
  { "$venv/bin/pip" "$@" 2>&1 1>&3 3>&- |
      { grep -v -E "^WARNING: Location '[^']*' is ignored" >&2 || true; }; } 3>&1
}

# Sourced (the tests): the functions only.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then return 0; fi

packages=(python3 python3-venv python3-dev gcc qemu-system-x86 ovmf busybox-static cpio
          zstd xz-utils openssl systemd sudo procps strace
          libfaketime)  # tests: a daemon whose wall clock steps (tests/vm/test_ttl_clock_step.py)
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
  pip_quietly install -q --upgrade pip
  say "installing cocos-manager and its dev tools"
  pip_quietly install -q -e "$root[dev]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi

tools=${TOOLS_VENV:-$root/.venv-tools}
tools_stamp=$tools/.installed-$(sha256sum "$root/scripts/lint-tools.txt" | cut -c1-16)
if [ ! -f "$tools_stamp" ]; then
  say "creating the lint tools' environment $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q -r "$root/scripts/lint-tools.txt"
  rm -f "$tools"/.installed-*
  touch "$tools_stamp"
fi
say "ready: $venv/bin/cocos-manager"
