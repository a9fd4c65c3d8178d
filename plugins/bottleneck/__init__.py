"""The `bottleneck` delta kind."""
