"""Searching a super-network: NSGA-II over its elastic choices, and the seeds' search-space files."""
