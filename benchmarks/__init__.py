"""fd-bench: measure FasterDiffusion against the every-step baseline (and diffusers) on an engine folder."""
