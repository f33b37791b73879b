"""Model servers from container images with podman (docs/containers.md)."""
