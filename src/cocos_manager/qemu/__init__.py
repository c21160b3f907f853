"""QEMU itself: the command line (pure), its environment, the spawn, the process and its QMP monitor, its output, what its failures mean, probes of the binary, and sudo."""
