"""This host and process: kernel probes, the scheduling weight, the state directory lock, VM records and process identity, background tasks and worker threads, check results."""
