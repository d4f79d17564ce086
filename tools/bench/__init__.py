"""One benchmark entry point, `python -m tools.bench SUBCOMMAND [options]` from the repo root.

Each subcommand is a module here with a docstring (its --help), `add_arguments(parser)`
and `run(args)`, registered in `SUBCOMMANDS` (__main__.py); all share the timing and
report harness (harness.py). tools/README.md lists them.
"""
