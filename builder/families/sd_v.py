"""tiny-v: a random-weight pipeline shaped like Stable Diffusion 2.x (v-prediction) at toy width.

What sets SD 2.x apart from 1.x, and what tiny-v keeps: the scheduler predicts v, attention is upcast to
fp32, transformers use linear in/out projections, the number of heads grows with the channels (SD2's
(5, 10, 20, 20) at head width 64), the text encoder uses GELU, and the tokenizer pads with "!".
"""
from __future__ import annotations

from builder.models import Components, make_tiny_tokenizer

TINY_V_SEED = 0

# SD 2.1's scheduler config (scheduler/scheduler_config.json): DDIM with v-prediction.
SD2_V_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}


def make_tiny_v_components(seed: int = TINY_V_SEED) -> Components:
    """SD 2.x's structure (4 UNet levels, 12 skips, 8x VAE, v-prediction) at toy width, 128 px native."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "!"})  # SD 2.x's OpenCLIP tokenizer pads with "!"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(1, 2, 4, 4),  # heads per level, head width 16: SD2's pattern scaled down
        use_linear_projection=True, upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), dict(SD2_V_SCHEDULER_CONFIG))
