"""GPU pools (docs/swap.md): on-demand instances that share their GPUs by memory."""
