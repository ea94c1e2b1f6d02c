"""fd builder: diffusers model → split ONNX graphs → checked engines in an engine folder (uses torch)."""
