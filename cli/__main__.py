"""`python -m runledger.cli`: the same as the `runledger` script."""

from runledger.cli.main import main

main()
