"""`python -m interplab` runs the command line (the same as the `interplab` script)."""

from interplab.cli import main

main()
