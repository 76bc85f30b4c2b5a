"""Sub-commands of the ``normmatters`` CLI (one module each: ``add_parser(sub)``, ``run(args)``)."""
