"""What the flow-matching families (SD3/SD3.5, FLUX.1) change in sampling, read by the pipeline through the
Family hooks:

- the sampler is flow-matching Euler (runtime/schedulers/flow_match.py): the scheduler registry makes fd's
  default scheduler name, or `model`, mean it, and refuses a diffusion (VP) sampler in one line;
- a config with dynamic shifting gets `mu` from the image's token count, as the pipelines compute it;
- the guidance interval is given in the VP frame's sigma, which for a flow sample is s / (1 − s);
- prior noise injection (runtime/pipeline.py): z ← z + α·ε on the VP latent is x ← x + α·sqrt((1 − s)² + s²)·ε
  on the flow sample (the scheduler's vp_scale), at the steps whose timestep s·1000 (after the shift, what the
  transformer is given) is below τ = 500, i.e. where the sample holds more signal than noise (s < 1/2, a > b).
"""
from __future__ import annotations

from fd.runtime.families.base import Family
from fd.runtime.schedulers.flow_match import dynamic_shift_mu


class FlowFamily(Family):
    noise_injection_tau = 500  # on the flow timestep s·1000: inject where s < 1/2

    def image_seq_len(self, manifest: dict, height: int, width: int) -> int:
        """The image's token count at this size (the tokens cache is an (h, w, width) grid per row)."""
        _, h, w, _ = manifest["components"]["denoiser_encoder"]["outputs"][0]["shape"]
        return h * w

    def timestep_options(self, manifest: dict, steps: int, height: int, width: int) -> dict:
        config = manifest["scheduler_config"]
        if not config.get("use_dynamic_shifting"):
            return {}
        return {"mu": dynamic_shift_mu(self.image_seq_len(manifest, height, width), config)}

    def guidance_sigmas(self, sampler, timesteps):
        return sampler.model_sigmas(timesteps)
