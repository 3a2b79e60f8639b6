"""Subcommands of the ``medfoundry`` CLI, one module each."""
