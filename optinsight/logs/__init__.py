"""Writers and readers of a run's logs (DESIGN.md section 4)."""
