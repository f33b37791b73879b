"""The systemd target's operations: D-Bus, deploy, status, doctor, logs, swap groups, the sandbox manager."""
