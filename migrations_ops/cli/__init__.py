"""The ``ops`` command's subcommands, one module per family, behind the one ``ops`` verb."""
