"""mtrace.cli: the ``mtrace`` command, config loading and target resolution."""
