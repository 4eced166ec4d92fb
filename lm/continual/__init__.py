"""Continuous learning: served traffic and new data back into training, gated and rolled out."""
