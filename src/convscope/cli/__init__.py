"""The ``convscope`` command line. Each ``cmd_*.py`` module here adds subcommands (see ``main.py``)."""
