"""`python -m kbloop …` runs the same command line as the `kbloop` script."""

from kbloop.cli import main

main()
