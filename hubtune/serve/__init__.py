"""Serve: fit, compare and measure cascades and ensembles of a hub's models (`hubtune serve`)."""
