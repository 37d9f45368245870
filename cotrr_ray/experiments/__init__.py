"""Online experiments (Ray-free): deterministic arm assignment, team-draft interleaving, experiment
statistics (SRM, mSPRT, delta method, fixed-horizon and sign tests) and a seeded click simulator."""
