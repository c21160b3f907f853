"""One VM's lifecycle: the `Machine` and its states, start, stop, record, guest watch, TTL, files, leased numbers, re-adoption after a restart, what List says, the attestation policy."""
