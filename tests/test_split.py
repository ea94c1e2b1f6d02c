"""The FasterDiffusion split in PyTorch: encoder → decoder equals the diffusers UNet, and batching
steps with different timesteps into one decoder call equals separate calls."""
import pytest
import torch

from fd.builder.split import UNetDecoder, UNetEncoder


def sd15_shaped_unet():
    """SD1.5's UNet config (random weights): 320/640/1280/1280 channels, cross-attention 768."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def split_vs_full(unet, latent_hw, text_dim, batch=2):
    torch.manual_seed(1)
    sample = torch.randn(batch, 4, *latent_hw)
    timestep = torch.tensor([981.0, 21.0][:batch])
    text = torch.randn(batch, 77, text_dim)
    with torch.no_grad():
        cache = UNetEncoder(unet)(sample, timestep, text)
        split = UNetDecoder(unet)(timestep, text, cache[0], cache[1:])
        full = unet(sample, timestep, text).sample
    return cache, split, full


def test_split_equals_unet_tiny(tiny_components):
    cache, split, full = split_vs_full(tiny_components.unet, (16, 16), 32)
    assert len(cache) == 13  # mid + conv_in + 3 + 3 + 3 + 2 skips, as in SD1.5
    assert (split - full).abs().max().item() <= 1e-5
    assert full.abs().max().item() > 1e-2  # a real output, not zeros


def test_split_equals_unet_sd15_shaped():
    unet = sd15_shaped_unet()
    cache, split, full = split_vs_full(unet, (16, 16), 768, batch=1)
    assert [tuple(t.shape[1:]) for t in cache[:2]] == [(1280, 2, 2), (320, 16, 16)]
    assert len(cache) == 13
    assert (split - full).abs().max().item() <= 1e-5


def test_decoder_rows_with_different_timesteps_equal_separate_calls(tiny_components):
    unet = tiny_components.unet
    torch.manual_seed(2)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    decoder = UNetDecoder(unet)
    timesteps = [981.0, 601.0, 21.0]
    with torch.no_grad():
        cache = UNetEncoder(unet)(sample, torch.full((2,), 981.0), text)
        rows = len(sample)
        batched = decoder(torch.tensor(timesteps).repeat_interleave(rows), text.repeat(3, 1, 1),
                          cache[0].repeat(3, 1, 1, 1), tuple(s.repeat(3, 1, 1, 1) for s in cache[1:]))
        separate = [decoder(torch.full((rows,), t), text, cache[0], cache[1:]) for t in timesteps]
    assert (batched - torch.cat(separate)).abs().max().item() <= 1e-5
    # the per-row timestep really acts: step 0 and step 2 differ
    assert (separate[0] - separate[2]).abs().max().item() > 1e-3


def test_unsupported_unet_is_refused():
    from diffusers import UNet2DConditionModel

    from fd.runtime.errors import FdError
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, class_embed_type="timestep")
    with pytest.raises(FdError, match="class_embed_type"):
        UNetEncoder(unet)
