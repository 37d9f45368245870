"""Online experiments (Ray-free): deterministic arm assignment."""
