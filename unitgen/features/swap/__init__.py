"""Swap groups (docs/swap.md): on-demand instances that take turns on a GPU."""
