"""Inference engines: one Engine protocol, three backends."""
