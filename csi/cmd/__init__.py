"""Subcommands of the elv command line (everything but serve and demo)."""
