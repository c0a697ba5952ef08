"""`python -m imgclf.cli`: the `imgclf` command."""

from . import main

main()
