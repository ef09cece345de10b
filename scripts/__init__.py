"""Entry points: ``python scripts/<name>.py``, or the installed ``db2-<name>`` commands (setup.py)."""
