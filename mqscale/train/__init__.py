"""Distributed Stackformer training (issue #6)."""
