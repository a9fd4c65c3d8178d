"""deltaserve.client."""
