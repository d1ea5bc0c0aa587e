"""Test support: worker processes, served test functions, shared models, reliability counts."""
