"""runledger CLI."""
