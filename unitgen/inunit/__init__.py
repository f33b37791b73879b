"""Small programs that run inside the units (``python -I -m unitgen.inunit.probe``,
``unitgen.inunit.gpuwait``). Standard library only at import time: they start
with every instance, before anything else is known to work."""
