#!/usr/bin/env bash
# Build a tiny test guest (kernel + busybox initramfs) from Debian packages only.
#
# Usage: scripts/build-test-guest.sh [OUTDIR]     (default: <repo>/build/guest)
# Produces OUTDIR/bzImage and OUTDIR/rootfs.cpio.gz: Debian's cloud kernel (LZ4-compressed,
# few drivers: the fastest boot under TCG), the guest of every test; and OUTDIR/9p/bzImage and
# OUTDIR/9p/rootfs.cpio.gz: Debian's generic kernel (linux-image-amd64), which has the 9p
# modules the cloud kernel lacks, for CreateVm'd VMs, whose agent gets its settings through
# two 9p shares (docs/contracts.md, "CreateVm, RemoveVm, CVMInfo"). Both have the same /init.
# (The generic kernel alone would do for all, but it is XZ-compressed and probes more devices:
# it took 11 CPU-seconds of TCG to serve against the cloud kernel's 7, docs/decisions.md.)
#
# The guest's /init plays the Cocos agent (docs/contracts.md, "The manifest"): it loads the
# virtio-net, qemu_fw_cfg and 9p modules, mounts the 9p shares when the VM has them (mount tag
# certs_share at /etc/certs, env_share at /etc/cocos, as upstream's guest does), reads the
# manifest from fw_cfg (opt/cocos/agent-config.json), prints "BOOTED <id>" on /dev/ttyS0
# (<id>: the manifest's id, or AGENT_CVM_ID of /etc/cocos/environment), brings up
# eth0 as 10.0.2.15/24 and then either powers off (manifest contains
# "cocos-test:poweroff", after printing "POWEROFF <id>") or serves on TCP port 7002 to every
# connection what it was handed (after printing "SERVING <id>"): the manifest bytes, or, for a
# VM with the shares, a document of "== NAME" sections: /etc/cocos/environment,
# /etc/certs/cert.pem (when there) and /proc/cmdline. Nothing of the shares goes to the console.
# It also handles the ACPI power button (QMP system_powerdown) as a guest OS
# should: the button and evdev modules and busybox acpid make it print
# "cocos-test: power button, shutting down" and power off at once.
#
# Needs root only when a package has to be installed. The kernel package is
# downloaded (apt-get download) and unpacked, never installed on the host.
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"
OUTDIR="${1:-$REPO_ROOT/build/guest}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$OUTDIR/work"
STAMP="$OUTDIR/.build-test-guest.stamp"

# Modules to load, in this order (dependencies are added before a module if missing).
BASE_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
              failover net_failover virtio_net qemu_fw_cfg evdev button)
BASE_REQUIRED=(virtio_net qemu_fw_cfg evdev button)
# The 9p guest's in addition (all required).
NINEP_MODULES=(fscache netfs 9pnet 9pnet_virtio 9p)

log() { echo "build-test-guest: $*"; }
die() { echo "build-test-guest: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- cache check
SCRIPT_SUM="$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"
if [[ -f "$OUTDIR/bzImage" && -f "$OUTDIR/rootfs.cpio.gz" && -f "$OUTDIR/9p/bzImage" \
      && -f "$OUTDIR/9p/rootfs.cpio.gz" && -f "$STAMP" ]] \
   && [[ "$(cat "$STAMP")" == "$SCRIPT_SUM" ]]; then
    echo "test guest up to date: $OUTDIR"
    exit 0
fi

# ---------------------------------------------------------------- apt helpers
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "running apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# ensure_pkg PACKAGE: apt-get install PACKAGE unless it is installed; dies if it cannot be had.
ensure_pkg() {
    local pkg=$1
    pkg_installed "$pkg" && return 0
    [[ $(id -u) == 0 ]] || die "package '$pkg' is missing and installing it needs root"
    log "installing $pkg"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
            || die "cannot install package '$pkg'"
    fi
}

# ensure_cmd COMMAND PACKAGE: install PACKAGE if COMMAND is missing.
ensure_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    ensure_pkg "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || die "package '$pkg' installed but '$cmd' still missing"
}

# download_deb PACKAGE: make sure $WORK/PACKAGE_*.deb exists (cached); prints its path.
download_deb() {
    local pkg=$1 deb
    deb="$(ls -t "$WORK/${pkg}"_*.deb 2>/dev/null | head -n1 || true)"
    if [[ -n $deb ]] && dpkg-deb -f "$deb" Package >/dev/null 2>&1; then
        log "using cached $(basename "$deb")" >&2
        echo "$deb"; return 0
    fi
    log "downloading $pkg" >&2
    rm -f "$WORK/${pkg}"_*.deb
    # apt-get download writes to the current directory; as root, chmod lets _apt write there too.
    if ! (cd "$WORK" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
        apt_update_once >&2
        (cd "$WORK" && apt-get download -qq "$pkg" >/dev/null) \
            || die "cannot download package '$pkg' (apt-get download failed)"
    fi
    deb="$(ls -t "$WORK/${pkg}"_*.deb 2>/dev/null | head -n1 || true)"
    [[ -n $deb ]] || die "apt-get download '$pkg' produced no .deb in $WORK"
    echo "$deb"
}

# resolve_kernel_pkg META: the concrete linux-image-<ver>[-cloud]-amd64 of the metapackage's
# candidate.
resolve_kernel_pkg() {
    apt-cache depends "$1" 2>/dev/null \
        | sed -n 's/^ *Depends: *<\{0,1\}\(linux-image-[0-9][^ >]*-amd64\)>\{0,1\}.*/\1/p' \
        | head -n1 || true
}

# ---------------------------------------------------------------- tools
command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian (12)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this script needs Debian (12)"
log "checking tools"
ensure_cmd cpio cpio
ensure_cmd gzip gzip
ensure_cmd sha256sum coreutils

mkdir -p "$WORK"
chmod 0755 "$WORK" 2>/dev/null || true

# ---------------------------------------------------------------- busybox
BUSYBOX=""
if ! pkg_installed busybox-static && pkg_installed busybox; then
    # busybox-static conflicts with the (dynamic) busybox package: don't replace the host's,
    # just unpack busybox-static's .deb.
    log "package busybox is installed; unpacking busybox-static instead of installing it"
    deb="$(download_deb busybox-static)"
    rm -rf "$WORK/busybox-static"
    dpkg-deb -x "$deb" "$WORK/busybox-static"
    for p in usr/bin/busybox bin/busybox; do
        if [[ -x "$WORK/busybox-static/$p" ]]; then BUSYBOX="$WORK/busybox-static/$p"; break; fi
    done
else
    ensure_pkg busybox-static
    BUSYBOX="$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1 || true)"
fi
[[ -n $BUSYBOX && -x $BUSYBOX ]] || die "no busybox-static binary found"
APPLETS="$("$BUSYBOX" --list)" || die "$BUSYBOX --list failed"
grep -qx nc <<<"$APPLETS" || die "$BUSYBOX has no nc applet"
log "busybox: $BUSYBOX"

# ---------------------------------------------------------------- one guest
# build_guest META DEST MODULE...: the kernel of metapackage META and an initramfs with the
# base modules and MODULE... (all required) into DEST/bzImage and DEST/rootfs.cpio.gz.
build_guest() {
local META=$1 DEST=$2
shift 2
local MODULES=("${BASE_MODULES[@]}" "$@") REQUIRED_MODULES=("${BASE_REQUIRED[@]}" "$@")
mkdir -p "$DEST"
log "resolving $META"
KPKG="$(resolve_kernel_pkg "$META")"
if [[ -z $KPKG ]]; then
    apt_update_once
    KPKG="$(resolve_kernel_pkg "$META")"
fi
[[ -n $KPKG ]] || die "cannot resolve the kernel package behind $META (apt-cache depends found nothing)"
log "kernel package: $KPKG"
KDEB="$(download_deb "$KPKG")"
KDIR="$WORK/kernel-$META"
KMARK="$KDIR/.extracted-from"
if [[ -f $KMARK && "$(cat "$KMARK")" == "$(basename "$KDEB")" ]]; then
    log "using extracted $(basename "$KDEB")"
else
    log "extracting $(basename "$KDEB")"
    rm -rf "$KDIR"
    mkdir -p "$KDIR"
    dpkg-deb -x "$KDEB" "$KDIR"
    basename "$KDEB" > "$KMARK"
fi
KVMLINUZ="$(ls "$KDIR"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)"
[[ -n $KVMLINUZ ]] || die "no boot/vmlinuz-* in $KDEB"
KVER="${KVMLINUZ##*/vmlinuz-}"
KMODDIR="$KDIR/lib/modules/$KVER"
[[ -d $KMODDIR ]] || die "no lib/modules/$KVER in $KDEB"
log "kernel version: $KVER"

# --- rootfs
ROOT="$WORK/rootfs-$META"
log "assembling initramfs in $ROOT"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,etc,root,lib/modules,etc/acpi/PWRF}
ln -s bin "$ROOT/sbin"
mkdir -p "$ROOT/usr"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
for applet in $APPLETS; do
    [[ $applet == busybox ]] && continue
    ln -sf busybox "$ROOT/bin/$applet"
done
# The kernel opens /dev/console before running /init; devtmpfs is mounted later.
if [[ $(id -u) == 0 ]]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
else
    log "not root: no /dev/console node in the initramfs (init redirects after mounting devtmpfs)"
fi

# --- modules
MOD_DONE=()
MOD_ORDER=()
is_builtin() { grep -Eq "/$1\.ko(\.[a-z]+)?$" "$KMODDIR/modules.builtin" 2>/dev/null; }
find_module() {
    # module names use '_', file names may use '-'
    local alt="${1//_/-}"
    find "$KMODDIR/kernel" \( -name "$1.ko" -o -name "$1.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) \
        -print -quit
}
copy_module() {
    local src=$1 dst=$2
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) ensure_cmd xz xz-utils; xz -dc "$src" > "$dst" ;;
        *.ko.zst) ensure_cmd zstd zstd; zstd -qdc "$src" > "$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *) die "unknown module compression: $src" ;;
    esac
}
add_module() {
    local m=$1 f deps d
    [[ -n ${MOD_DONE[$m]:-} ]] && return 0
    MOD_DONE[$m]=1
    f="$(find_module "$m")"
    if [[ -z $f ]]; then
        if is_builtin "$m"; then
            log "module $m: built in"
        else
            log "module $m: neither module nor built in, skipped"
        fi
        return 0
    fi
    copy_module "$f" "$ROOT/lib/modules/$m.ko"
    deps="$(tr '\0' '\n' < "$ROOT/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')"
    for d in $deps; do add_module "$d"; done
    MOD_ORDER+=("$m")
    log "module $m: $(basename "$f")${deps:+ (depends: $deps)}"
}
for m in "${MODULES[@]}"; do add_module "$m"; done
for m in "${REQUIRED_MODULES[@]}"; do
    [[ -f "$ROOT/lib/modules/$m.ko" ]] || is_builtin "$m" \
        || die "$m is neither a module nor built into $KVER"
done
printf '%s\n' "${MOD_ORDER[@]}" > "$ROOT/lib/modules/load-order"

# --- the power button: busybox acpid maps the evdev KEY_POWER press to the action PWRF and
# runs /etc/acpi/PWRF/00000080 (a file: run with the event as argument).
cat > "$ROOT/etc/acpi/PWRF/00000080" <<'POWER'
#!/bin/busybox sh
echo "cocos-test: power button, shutting down" > /dev/ttyS0
sync
poweroff -f
POWER
chmod 0755 "$ROOT/etc/acpi/PWRF/00000080"

# --- /init
cat > "$ROOT/init" <<'INIT'
#!/bin/busybox sh
# Test guest init: plays the Cocos agent (see scripts/build-test-guest.sh).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# If the kernel could not open a console, give ourselves one.
[ -e /proc/self/fd/1 ] || exec </dev/console >/dev/console 2>&1

say() { echo "$*" > /dev/ttyS0; }

for m in $(cat /lib/modules/load-order); do
    out=$(insmod "/lib/modules/$m.ko" 2>&1) || case "$out" in
        *"File exists"*|*"already"*) ;;
        *) echo "init: insmod $m: $out" ;;
    esac
done

# The ACPI power button (button.ko) is an input device; acpid opens /dev/input/event* at
# start, so it starts once the modules are in and devtmpfs has the nodes.
i=0
while ! ls /dev/input/event* >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
acpid -f -c /etc/acpi -l /tmp/acpid.log &

# The agent's settings of a CreateVm'd VM: two 9p shares, mounted where upstream's guest
# mounts them (a VM of Run has neither: the mounts fail quietly).
mkdir -p /etc/certs /etc/cocos
mount -t 9p -o trans=virtio,version=9p2000.L certs_share /etc/certs 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L env_share /etc/cocos 2>/dev/null

F=/sys/firmware/qemu_fw_cfg/by_name/opt/cocos/agent-config.json/raw
i=0
while [ ! -e "$F" ] && [ $i -lt 50 ]; do
    # The by_name tree is filled when qemu_fw_cfg probes (during insmod): once it exists
    # and a short grace has passed, a missing entry is really missing.
    if [ -d /sys/firmware/qemu_fw_cfg/by_name ] && [ $i -ge 5 ]; then break; fi
    sleep 0.1
    i=$((i+1))
done
if [ -e "$F" ]; then
    cat "$F" > /manifest
else
    echo "init: no manifest in fw_cfg, using {}"
    printf '{}' > /manifest
fi
id=$(tr ',{}' '\n\n\n' < /manifest \
     | sed -n 's/^[[:space:]]*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n 1)
if [ -f /etc/cocos/environment ]; then
    [ -n "$id" ] || id=$(sed -n 's/^AGENT_CVM_ID=//p' /etc/cocos/environment | head -n 1)
    {
        echo "== /etc/cocos/environment"; cat /etc/cocos/environment
        if [ -f /etc/certs/cert.pem ]; then echo "== /etc/certs/cert.pem"; cat /etc/certs/cert.pem; fi
        echo "== /proc/cmdline"; cat /proc/cmdline
    } > /served
else
    cp /manifest /served
fi

say "BOOTED $id"

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up

if grep -q 'cocos-test:poweroff' /manifest; then
    say "POWEROFF $id"
    sync
    poweroff -f
fi

# Serve what it was handed, whole, to every connection, then close it (one forked cat per
# client).
(while :; do nc -ll -p 7002 -e cat /served; sleep 1; done) &
# Port 7002 = 0x1B5A; state 0A = LISTEN.
i=0
while ! grep -q ':1B5A [0-9A-F:]* 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null && [ $i -lt 100 ]; do
    sleep 0.05
    i=$((i+1))
done
say "SERVING $id"

while :; do sleep 3600; done
INIT
chmod 0755 "$ROOT/init"

# --- outputs
log "writing $DEST/rootfs.cpio.gz"
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n > "$DEST/rootfs.cpio.gz.tmp"
mv -f "$DEST/rootfs.cpio.gz.tmp" "$DEST/rootfs.cpio.gz"
log "writing $DEST/bzImage ($(basename "$KVMLINUZ"))"
cp "$KVMLINUZ" "$DEST/bzImage.tmp"
mv -f "$DEST/bzImage.tmp" "$DEST/bzImage"
}

# ---------------------------------------------------------------- outputs
declare -A MOD_DONE=()
rm -f "$STAMP"
build_guest linux-image-cloud-amd64 "$OUTDIR"
build_guest linux-image-amd64 "$OUTDIR/9p" "${NINEP_MODULES[@]}"
echo "$SCRIPT_SUM" > "$STAMP"
log "done: $OUTDIR/bzImage $OUTDIR/rootfs.cpio.gz, $OUTDIR/9p/bzImage $OUTDIR/9p/rootfs.cpio.gz"
