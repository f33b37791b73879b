"""The systemd target: unit files (templates in the top-level ``templates/systemd``),
the escaping for them, and reading back the units unitgen installed."""
