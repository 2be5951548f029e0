"""registry app."""
