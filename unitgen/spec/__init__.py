"""The spec layer: what a user writes (one TOML file per instance), what each
key means, the backends' command-line contracts and the port rules.

Knows TOML and model servers; knows nothing about systemd or supervisor.
"""
