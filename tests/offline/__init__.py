"""Fast, offline: no manager. Spec, ports, rendering and golden files, escaping,
the probe against scripted servers, GPUs against a fake NVML, the CLI."""
