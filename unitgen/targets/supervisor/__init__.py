"""The supervisor target: one conf file per instance for supervisord's include directory."""
