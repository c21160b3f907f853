"""What the operator configures: every `MANAGER_*` variable as a typed setting, the Go-style value parsers, unknown-variable hints, and the credential files the settings name."""
