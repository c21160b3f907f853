"""What each setting does, in one line, for the README's settings table (settings_table.py).

Kept beside settings.py rather than in it so that adding a setting stays a one-line change
there; `tests/test_settings_table.py` fails when a field has no line here (or a line names no
field), and `make settings-table` rewrites the README's table. A field may instead carry its
text itself, as `Field(..., description="...")`. Markdown is allowed; `|` is escaped.
"""

from __future__ import annotations

HELP: dict[str, str] = {
    # -- service --------------------------------------------------------------------------------
    "MANAGER_LOG_FORMAT": "`json` (one JSON object a line, for journald and Loki) or `text` (for a "
    "person at a terminal)",
    "MANAGER_LOG_LEVEL": "`debug`, `info`, `warn` or `error`: the daemon's JSON log lines",
    "MANAGER_GRPC_HOST": "address the gRPC API listens on; empty = every interface (anyone "
    "reaching it can run VMs: `127.0.0.1`, or TLS)",
    "MANAGER_GRPC_PORT": "port of the gRPC API (`0`: a free one, logged at start)",
    "MANAGER_GRPC_SERVER_CERT": "server certificate (path or PEM): with `_SERVER_KEY`, the API "
    "speaks TLS",
    "MANAGER_GRPC_SERVER_KEY": "the server certificate's private key (path or PEM)",
    "MANAGER_GRPC_SERVER_CA_CERTS": "the chain sent with the server certificate; with "
    "`MANAGER_GRPC_URL` also the dial-out's trust root",
    "MANAGER_GRPC_CLIENT_CA_CERTS": "CA of client certificates: set = mutual TLS, clients "
    "without a certificate it signed are refused",
    "COCOS_JAEGER_URL": "where traces go: Jaeger's collector (`/api/traces`) or OTLP/HTTP "
    "(`/v1/traces`); `off` = no tracing",
    "MANAGER_INSTANCE_ID": "this daemon's id in traces; empty = a fresh UUID per start",
    "MANAGER_METRICS_PORT": "Prometheus `/metrics` on this port; unset = no metrics",
    "MANAGER_MAX_VMS": "Runs beyond this many VMs get `RESOURCE_EXHAUSTED`; `0` = no limit",
    "MANAGER_STATE_DIR": "VM records (restart survival) and the daemon's lock; one daemon per "
    "directory; relative = to the working directory at start",
    "MANAGER_SHUTDOWN_STOPS_VMS": "`false`: SIGTERM leaves VMs running for the next start to "
    "adopt (upgrades)",
    "MANAGER_METRICS_HOST": "address `/metrics` listens on; empty = `MANAGER_GRPC_HOST`'s",
    "MANAGER_GRPC_MAX_MESSAGE_SIZE": "largest gRPC request in bytes; larger ones get "
    "`RESOURCE_EXHAUSTED`",
    "MANAGER_GRPC_KEEPALIVE": "how often each client connection is pinged (`0`: never, else "
    "`1s` or more); one that does not answer within `MANAGER_GRPC_KEEPALIVE_TIMEOUT` is "
    "disconnected and its Events or Logs stream's place freed",
    "MANAGER_GRPC_KEEPALIVE_TIMEOUT": "how long a ping may go unanswered (`1s` or more)",
    "MANAGER_EVENTS_MAX_SUBSCRIBERS": "Events streams at once (`0`: no limit); beyond, "
    "`RESOURCE_EXHAUSTED`",
    "MANAGER_EVENTS_QUEUE_BYTES": "each Events stream's queue in bytes (and at most 4096 "
    "messages); a stream that cannot keep up loses messages, announced by `events-lost`",
    "MANAGER_EVENTS_RETAIN": "messages kept for replay (`EventsRequest.since`)",
    "MANAGER_EVENTS_RETAIN_BYTES": "bytes of messages kept for replay",
    "MANAGER_EVENTS_HOLD_TIMEOUT": "longest an agent is held back by an Events stream with a "
    "backlog of its computation's messages",
    "MANAGER_AGENT_MAX_CONNECTIONS_PER_CID": "vsock connections one guest may hold open "
    "(`0`: no limit)",
    "MANAGER_CONSOLE_LINES_PER_SECOND": "QEMU console lines per VM in the daemon's log "
    "(`0`: no limit); the rest is counted as suppressed; Events and Logs still get every line",
    "MANAGER_CONSOLE_FILE_BYTES": "disk of each VM's console file, kept by a process of the VM's own "
    "across daemon restarts; the oldest half goes first (`262144` or more)",
    "MANAGER_CONSOLE_LINES_BURST": "console lines per VM logged at once before the rate applies",
    "MANAGER_AUTOGROUP_NICE": "the scheduling weight of the daemon's session against its "
    "guests' (needs `CAP_SYS_NICE`, root cpu cgroup); `0` leaves the default",
    "MANAGER_GRPC_URL": "a computations server to dial (`host:port`): the original's "
    "deployment; empty = no dial-out",
    "MANAGER_GRPC_TIMEOUT": "dial-out: how long connecting, or one message, may take",
    "MANAGER_GRPC_CLIENT_CERT": "dial-out: client certificate (path or PEM), mutual TLS",
    "MANAGER_GRPC_CLIENT_KEY": "dial-out: the client certificate's key (path or PEM)",
    "MANAGER_GRPC_URL_CA_CERTS": "dial-out: the CA of the computations server's certificate, "
    "when it must differ from `MANAGER_GRPC_SERVER_CA_CERTS`",
    "MANAGER_GRPC_ATTESTED_TLS": "dial-out: `true` is refused at start (not supported)",
    "MANAGER_GRPC_MANIFEST": "dial-out: attested TLS's policy; ignored, with a warning",
    "MANAGER_DEFAULT_TTL": "a Run without its own `ttl` is stopped after this long; unset or "
    "`0` = no TTL",
    "MANAGER_LOG_HISTORY_LINES": "console lines kept per VM for Logs",
    "MANAGER_LOG_HISTORY_BYTES": "console bytes kept per VM (text plus 64 per line)",
    "MANAGER_LOG_RETENTION": "how long an ended VM's console stays readable",
    "MANAGER_LOG_RETAINED_VMS": "ended VMs whose console is kept (the newest); `0` = none",
    "MANAGER_LOG_MAX_STREAMS": "Logs streams at once, tail or follow; beyond, `RESOURCE_EXHAUSTED`; "
    "`0` = no limit",
    "MANAGER_EOS_VERSION": "upstream Cocos's: the guest OS image's version, as CVMInfo reports it",
    # -- QEMU -----------------------------------------------------------------------------------
    "MANAGER_QEMU_BIN_PATH": "the QEMU binary (a name on `PATH`, or a path)",
    "MANAGER_QEMU_TMP_FILE_LOC": "per-VM files: kernel, rootfs and `OVMF_VARS` copies, QMP "
    "socket, fw_cfg manifest (directory 0700)",
    "MANAGER_QEMU_USE_SUDO": "run QEMU as `sudo -n -C N -- QEMU` (a daemon that is not root)",
    "MANAGER_QEMU_ENABLE_SEV": "AMD SEV (`sev-guest`)",
    "MANAGER_QEMU_ENABLE_SEV_SNP": "AMD SEV-SNP; needs an SNP host and a QEMU that speaks "
    "`MANAGER_QEMU_SEV_SNP_SYNTAX`; `false` on any other host",
    "MANAGER_QEMU_ENABLE_KVM": "`-enable-kvm`; `false` = TCG (emulation, slow)",
    "MANAGER_QEMU_MACHINE": "`-machine`",
    "MANAGER_QEMU_CPU": "`-cpu`; under TCG use `max`",
    "MANAGER_QEMU_SMP_COUNT": "vCPUs per VM (`-smp`)",
    "MANAGER_QEMU_SMP_MAXCPUS": "`-smp maxcpus=`",
    "MANAGER_QEMU_MEM_ID": "id of the memory backend object",
    "MANAGER_QEMU_MEMORY_SIZE": "memory per VM (`-m`)",
    "MANAGER_QEMU_MEMORY_SLOTS": "`-m slots=`",
    "MANAGER_QEMU_MAX_MEMORY": "`-m maxmem=`",
    "MANAGER_QEMU_OVMF_CODE_IF": "OVMF code drive's `if=`",
    "MANAGER_QEMU_OVMF_CODE_FORMAT": "OVMF code drive's `format=`",
    "MANAGER_QEMU_OVMF_CODE_UNIT": "OVMF code drive's `unit=`",
    "MANAGER_QEMU_OVMF_CODE_FILE": "OVMF firmware code (Debian's `ovmf` package)",
    "MANAGER_QEMU_OVMF_CODE_READONLY": "OVMF code drive's `readonly=`",
    "MANAGER_QEMU_OVMF_VARS_IF": "OVMF variables drive's `if=`",
    "MANAGER_QEMU_OVMF_VARS_FORMAT": "OVMF variables drive's `format=`",
    "MANAGER_QEMU_OVMF_VARS_UNIT": "OVMF variables drive's `unit=`",
    "MANAGER_QEMU_OVMF_VARS_FILE": "OVMF variables template; each VM gets a private copy",
    "MANAGER_QEMU_NETDEV_ID": "id of the user-mode network device (per VM: `ID-UUID`)",
    "MANAGER_QEMU_HOST_FWD_AGENT": "host port in the base command line only "
    "(`print-qemu-cmd --original`); each VM gets a free port",
    "MANAGER_QEMU_GUEST_FWD_AGENT": "guest port every VM's host port forwards to: where the "
    "agent listens",
    "MANAGER_QEMU_VIRTIO_NET_PCI_DISABLE_LEGACY": "virtio-net-pci's `disable-legacy=`",
    "MANAGER_QEMU_VIRTIO_NET_PCI_IOMMU_PLATFORM": "virtio-net-pci's `iommu_platform=`",
    "MANAGER_QEMU_VIRTIO_NET_PCI_ADDR": "virtio-net-pci's `addr=`",
    "MANAGER_QEMU_VIRTIO_NET_PCI_ROMFILE": "virtio-net-pci's `romfile=`",
    "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": "the guest kernel (a Cocos release's, or `make "
    "guest`'s `build/guest/bzImage`)",
    "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": "the guest initramfs with the agent",
    "MANAGER_QEMU_KERNEL_HASH": "`kernel-hashes=on` (SEV measures kernel, initrd and command "
    "line; no `OVMF_VARS` drive)",
    "MANAGER_QEMU_NO_GRAPHIC": "`-nographic`: the serial console on QEMU's stdout (Logs)",
    "MANAGER_QEMU_MONITOR": "`-monitor`",
    "MANAGER_QEMU_SEV_ID": "id of the SEV guest object (per VM: `ID-UUID`)",
    "MANAGER_QEMU_SEV_CBITPOS": "SEV `cbitpos=`",
    "MANAGER_QEMU_SEV_REDUCED_PHYS_BITS": "SEV `reduced-phys-bits=`",
    "MANAGER_QEMU_VSOCK_ID": "id of the vhost-vsock device",
    "MANAGER_QEMU_VSOCK_GUEST_CID": "lowest guest CID; each VM gets the lowest free one",
    "MANAGER_QEMU_VSOCK_VNC": "lowest VNC display (port 5900+N); each VM gets the lowest free one",
    "MANAGER_QEMU_KERNEL_CMDLINE": "the `-append` value; the original's quoted default "
    "reaches Linux as one parameter: set e.g. `console=ttyS0`",
    "MANAGER_QEMU_AGENT_CHANNEL": "`vsock`: manifest over vhost-vsock (CID, 9999) and agent "
    "events back; `fw_cfg`: manifest by `-fw_cfg`, no vsock device",
    "MANAGER_QEMU_HOST_FWD_RANGE": "host ports for the agent from this range, e.g. `6100-6200`",
    "MANAGER_QEMU_STOP_TIMEOUT": "Stop: SIGTERM, then SIGKILL after this long",
    "MANAGER_QEMU_START_TIMEOUT": "how long Run waits for QMP readiness (and, on vsock, for "
    "the agent to take the manifest)",
    "MANAGER_QEMU_POWERDOWN_GRACE": "Stop presses the ACPI power button and waits this long "
    "before SIGTERM; `0s` = SIGTERM at once",
    "MANAGER_QEMU_ON_GUEST_HALT": "`stop`: a guest QEMU halted (error, panic) is stopped; "
    "`keep`: left for inspection, state `paused`",
    "MANAGER_QEMU_ADOPT_TIMEOUT": "after a restart, how long a VM's QMP monitor may take to "
    "answer before the VM is killed rather than adopted",
    "MANAGER_QEMU_HOST_FWD_ADDR": "host IPv4 address of the agent's forwarded port; empty = "
    "every interface",
    "MANAGER_QEMU_VNC_ADDR": "host address of each VM's VNC server (no password); empty = "
    "every interface",
    "MANAGER_QEMU_PASS_ENV": "comma-separated names of further variables QEMU gets (it gets "
    "only `PATH`, `LANG`, `LC_*`, `TZ`, `TMPDIR`, ...)",
    "MANAGER_QEMU_SEV_SNP_SYNTAX": "`seed` (AMD's old fork's flags), `upstream` (QEMU 9.1+) or "
    "`auto`",
    "MANAGER_QEMU_SEV_SNP_POLICY": "the SNP guest policy (decimal or `0x` hex; bit 17 set)",
    "MANAGER_QEMU_SEV_SNP_GUEST_FEATURES": "the VMSA's SEV features, for the measurement only",
    "MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE": "SNP ID block (96 bytes, raw or base64); with "
    "`_ID_AUTH_FILE`; upstream syntax",
    "MANAGER_QEMU_SEV_SNP_ID_AUTH_FILE": "the ID block's authentication structure (4096 bytes)",
    "MANAGER_QEMU_SEV_SNP_AUTHOR_KEY_ENABLED": "`author-key-enabled` with the ID block",
    "MANAGER_QEMU_BIND_MANIFEST": "SNP `host-data` / TDX `mrconfigid` = digest of each VM's "
    "manifest; upstream SNP or TDX",
    "MANAGER_QEMU_BIOS_FILE": "firmware (`-bios`) for upstream SNP and TDX",
    "MANAGER_QEMU_ENABLE_TDX": "Intel TDX (QEMU 10.1+); not with SEV or SEV-SNP",
    "MANAGER_QEMU_TDX_ID": "id of the tdx-guest object",
    "MANAGER_QEMU_OVMF_VERSION": "upstream Cocos's: the firmware's version, as CVMInfo reports it "
    "(not read from the firmware)",
    "MANAGER_QEMU_MAX_SMP": "the most vCPUs a Run may ask for (`vcpus`); `0` = `MANAGER_QEMU_SMP_COUNT` "
    "is the ceiling",
    "MANAGER_QEMU_MAX_MEMORY_PER_VM": "the most memory a Run may ask for (`memory_mib`), written as QEMU "
    "sizes (`8G`); unset = `MANAGER_QEMU_MEMORY_SIZE` is the ceiling",
    "MANAGER_QEMU_TDX_QUOTE_GENERATION_SOCKET": "the host's quote generation service: a UNIX "
    "socket path or `vsock:CID:PORT`",
}

# Where the default is better said than shown (an empty value, a number in hex).
DEFAULT_TEXT: dict[str, str] = {
    "MANAGER_GRPC_HOST": "(every interface)",
    "MANAGER_METRICS_PORT": "(off)",
    "MANAGER_METRICS_HOST": "(`MANAGER_GRPC_HOST`'s)",
    "MANAGER_INSTANCE_ID": "(a UUID per start)",
    "MANAGER_DEFAULT_TTL": "(no TTL)",
    "MANAGER_GRPC_URL": "(no dial-out)",
    "MANAGER_QEMU_HOST_FWD_RANGE": "(any free port)",
    "MANAGER_QEMU_HOST_FWD_ADDR": "(every interface)",
    "MANAGER_QEMU_VNC_ADDR": "(every interface)",
    "MANAGER_QEMU_SEV_SNP_POLICY": "`0x30000`",
    "MANAGER_QEMU_SEV_SNP_GUEST_FEATURES": "`0x1`",
    "MANAGER_GRPC_MAX_MESSAGE_SIZE": "`8388608` (8 MiB)",
    "MANAGER_EVENTS_QUEUE_BYTES": "`16777216` (16 MiB)",
    "MANAGER_EVENTS_RETAIN_BYTES": "`16777216` (16 MiB)",
    "MANAGER_LOG_HISTORY_BYTES": "`262144` (256 KiB)",
}
