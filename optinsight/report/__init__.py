"""Turning a run's logs into pictures: `plots` (matplotlib figures), `html` (one page)."""
