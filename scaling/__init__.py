"""scaling app."""
