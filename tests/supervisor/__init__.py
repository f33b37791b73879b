"""A real supervisord (tests/supervisord.py) with the stand-in server: the
supervisor target end to end."""
