"""Targets: each turns plans into the files of one process manager. A second
target is a sibling folder that reuses everything above it (spec, plan)."""
