"""Loom: a decentralized GPU cloud."""
