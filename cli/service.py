"""`runledger up` and `runledger serve` (filled in by the service work)."""
