"""Fallback copy of grpc.health.v1 (generated)."""
