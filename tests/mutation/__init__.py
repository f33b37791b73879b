"""Mutation testing of the core modules (mutmut); run with tests/mutation/run.sh."""
