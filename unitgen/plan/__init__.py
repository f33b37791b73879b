"""The planning layer: a validated spec becomes a complete, frozen plan of one
instance (endpoints, ports, GPUs, secrets, argv) that every target renders.

Imports the spec layer; knows nothing about any target's file format.
"""
