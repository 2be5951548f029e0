"""serving app."""
