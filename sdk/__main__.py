"""`python -m edge_recover` runs the CLI."""

from .cli import main

main()
