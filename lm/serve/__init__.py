"""Serving: engine.py (batched generation, no Ray), cache.py, quantize.py; app.py (Ray Serve)."""
