"""A real systemd user manager (tests/conftest.py starts a private one): socket
activation, deploy over D-Bus, status, faults, swap groups, attacks by another uid."""
