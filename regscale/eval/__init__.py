"""Distributed sampling and ADM-protocol metrics (FID, sFID, IS, precision, recall)."""
