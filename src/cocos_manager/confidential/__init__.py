"""Confidential launch: which SEV / SEV-SNP / TDX mode the settings make, its command-line pieces, and the checks of settings and host."""
