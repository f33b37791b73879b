"""A real systemd system manager: this machine's OS booted with systemd-nspawn
(tests/nspawn.py), every hardening default on."""
