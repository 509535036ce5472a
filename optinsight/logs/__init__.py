"""Writers and readers of a run's logs (formats: docs/logs.md)."""
