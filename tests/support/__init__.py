"""Test helpers: tiny models, fake teachers, running servers."""
