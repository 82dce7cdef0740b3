"""One module per ``memloc`` subcommand; each defines ``add_parser(subparsers)``.

``add_parser`` registers the subcommand's parser (with ``--help`` text) and sets
``func=run``, where ``run(args) -> int`` does the work and returns the exit code.
"""
