"""Explorer static assets (package data)."""
