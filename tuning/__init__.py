"""deltaserve.tuning."""
