"""Pallas kernel families (each in its own subpackage) with their pure-JAX references."""
