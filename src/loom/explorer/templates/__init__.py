"""Explorer page templates (package data)."""
