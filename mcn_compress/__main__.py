"""`python -m mcn_compress` runs the command-line interface."""

from mcn_compress.cli import main

main()
