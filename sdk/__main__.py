"""`python -m edge_recover` runs the CLI, the same as the `edge-recover` script."""

from .cli import main

if __name__ == "__main__":
    main()
