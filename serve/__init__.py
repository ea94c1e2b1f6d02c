"""fd-serve: FasterDiffusion engine folders as an HTTP service on Ray Serve (see serve/app.py)."""
