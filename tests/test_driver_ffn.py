"""FFN discovery: counts, shapes, names and forward order on published configs; GELU FFNs; model identity."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from memloc.collect import Accumulators, instrument
from memloc.errors import MemlocError
from memloc.ffn import check_identity, find_ffn_layers, identity
from memloc.tiny import SD1_DOWN, SD1_UP, build_tiny_pipeline, write_char_tokenizer

# UNet configs of the published checkpoints (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0), as far as they shape the FFNs.
SD15 = dict(
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=SD1_DOWN, up_block_types=SD1_UP, layers_per_block=2,
)
SD2 = dict(
    sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    block_out_channels=(320, 640, 1280, 1280), down_block_types=SD1_DOWN, up_block_types=SD1_UP, layers_per_block=2,
)
SDXL = dict(
    sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, layers_per_block=2,
)
SD1_SHAPES = {(320, 1280): 5, (640, 2560): 5, (1280, 5120): 6}


def _meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize(
    ("config", "count", "shapes", "weights"),
    [
        (SD15, 16, SD1_SHAPES, 49_561_600),
        (SD2, 16, SD1_SHAPES, 49_561_600),
        (SDXL, 70, {(640, 2560): 10, (1280, 5120): 60}, 409_600_000),
    ],
    ids=["sd1.5", "sd2", "sdxl"],
)
def test_layer_counts_and_shapes_on_published_configs(config, count, shapes, weights):
    layers = find_ffn_layers(_meta_unet(config))
    assert len(layers) == count
    assert Counter((layer.d_out, layer.d_in) for layer in layers) == shapes
    assert sum(layer.d_out * layer.d_in for layer in layers) == weights
    assert all(layer.kind == "geglu" and layer.name.endswith(".ff.net.2") for layer in layers)
    blocks = [layer.name.split(".")[0] for layer in layers]
    assert blocks == sorted(blocks, key=["down_blocks", "mid_block", "up_blocks"].index)


def test_sd15_names_are_the_state_dict_paths():
    unet = _meta_unet(SD15)
    layers = find_ffn_layers(unet)
    assert layers[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert layers[6].name == "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    assert layers[-1].name == "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"
    keys = set(unet.state_dict())
    assert all(f"{layer.name}.weight" in keys for layer in layers)


def test_order_is_the_order_of_the_forward_pass(tmp_path):
    pipe = build_tiny_pipeline(write_char_tokenizer(tmp_path / "tok"), channels=(16, 32, 32, 32))
    layers = find_ffn_layers(pipe.unet)
    seen = []
    handles = [layer.linear.register_forward_pre_hook(lambda m, a, n=layer.name: seen.append(n)) for layer in layers]
    with torch.no_grad():
        pipe.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    for handle in handles:
        handle.remove()
    assert seen == [layer.name for layer in layers]


def test_transformer_ffns_are_found_with_their_gelu_kind():
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=3, sample_size=8,
                                          cross_attention_dim=16, caption_channels=12)
        sd3 = SD3Transformer2DModel(sample_size=8, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                                    joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                                    in_channels=4, out_channels=4, pos_embed_max_size=8)
    pixart_layers = find_ffn_layers(pixart)
    assert [layer.name for layer in pixart_layers] == [f"transformer_blocks.{i}.ff.net.2" for i in range(3)]
    assert {layer.kind for layer in pixart_layers} == {"gelu-tanh"}
    # SD3's last joint block has no context FFN (context_pre_only)
    assert [layer.name for layer in find_ffn_layers(sd3)] == [
        "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
        "transformer_blocks.1.ff.net.2", "transformer_blocks.1.ff_context.net.2",
        "transformer_blocks.2.ff.net.2",
    ]


def test_gelu_ffn_statistics_via_pre_hook_equal_independent_hooks():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8,
                                     cross_attention_dim=16, caption_channels=12, norm_num_groups=8).eval()
    layers = find_ffn_layers(model)
    expected = {}
    handles = [layer.linear.register_forward_pre_hook(
        lambda m, a, n=layer.name: expected.__setitem__(n, a[0].double().pow(2).sum(1))) for layer in layers]
    accs = Accumulators(layers, n_steps=1, device=torch.device("cpu"))
    accs.reset(3)
    inputs = dict(hidden_states=torch.randn(3, 4, 8, 8), encoder_hidden_states=torch.randn(3, 5, 12),
                  timestep=torch.tensor([10, 500, 900]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad(), instrument(layers, accs):
        out = model(**inputs).sample
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, out)  # instrumenting does not change the output
    for i, layer in enumerate(layers):
        torch.testing.assert_close(accs.current(i).double(), expected[layer.name], rtol=1e-5, atol=0)


def test_denoiser_without_ffns_is_rejected():
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                           up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    with pytest.raises(MemlocError, match="no transformer feed-forward layers"):
        find_ffn_layers(unet)


def test_collect_rejects_a_pipeline_it_cannot_denoise(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from memloc.collect import collect_statistics

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8,
                                        norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    with pytest.raises(MemlocError, match="collect runs text-to-image UNet pipelines"):
        collect_statistics(["a cat"], tmp_path / "s.safetensors", pipe=pipe, steps=2, timesteps=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_identity_tells_models_apart_but_not_dtypes(tmp_path):
    tok = write_char_tokenizer(tmp_path / "tok")
    unet = build_tiny_pipeline(tok, seed=1, channels=(16, 32, 32, 32)).unet
    same = identity(unet, find_ffn_layers(unet))
    check_identity(same, identity(unet.half(), find_ffn_layers(unet)), "file")  # a dtype change is the same model
    unet.float()
    other = build_tiny_pipeline(tok, seed=2, channels=(16, 32, 32, 32)).unet
    with pytest.raises(MemlocError, match="different model"):
        check_identity(same, identity(other, find_ffn_layers(other)), "file")
    wider = build_tiny_pipeline(tok, seed=1, channels=(32, 32, 32, 32)).unet
    with pytest.raises(MemlocError, match=r"is \[16, 64\] there, \[32, 128\] here"):
        check_identity(same, identity(wider, find_ffn_layers(wider)), "file")
    renamed = dict(same, layers=[dict(layer, name="x") for layer in same["layers"]])
    with pytest.raises(MemlocError, match="layer x where the model has"):
        check_identity(renamed, same, "file")
