"""fd runtime: FasterDiffusion generation from an engine folder (numpy + one inference backend, no torch)."""
