"""Operations: the verbs (check, render, deploy, status, remove, logs, doctor)
run against a manager: files on disk, systemd over D-Bus, the journal."""
