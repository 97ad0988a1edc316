"""Helpers shared by the tests: making data modules and making or tampering with shards."""
