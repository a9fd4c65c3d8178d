"""The `sparse` delta kind."""
