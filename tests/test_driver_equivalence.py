"""The driver's statistics and masks against an independent hook-based eq. 2-7; resume; exact prune undo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_masks_equal

import memloc_kernels as mk
from memloc import cli
from memloc.api import apply_masks, collect_statistics, load_pipeline, load_stats, localize, read_mask_file
from memloc.tiny import build_tiny_pipeline, write_char_tokenizer

PROMPTS = ["a photo of a cat", "a red car on a road", "the mona lisa", "blue sky over green hills"]
STEPS, TAU, GUIDANCE, SEED = 3, 1, 7.5, 10
SUBSETS = [[0, 1, 2], [1, 3], [0, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    pipe = build_tiny_pipeline(write_char_tokenizer(root / "tokenizer"), seed=1, channels=(16, 32, 32, 32))
    pipe.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def collected(model_dir, prompt_file, tmp_path_factory):
    """Statistics of PROMPTS with the empty-prompt null run, in one batch (as the hooked pipeline call)."""
    return collect_statistics(
        prompt_file, tmp_path_factory.mktemp("stats") / "s.safetensors", model=model_dir, batch_size=len(PROMPTS),
        steps=STEPS, timesteps=TAU, guidance_scale=GUIDANCE, seed=SEED, null="empty", device="cpu", progress=False,
    )


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(model_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def hooked(pipe):
    """The independent statistics of PROMPTS and of the empty prompt with the same seeds, per layer [P, T, d]."""
    seeds = [SEED + i for i in range(len(PROMPTS))]
    prompt_run = hooked_statistics(pipe, PROMPTS, seeds)
    empty_run = hooked_statistics(pipe, [""] * len(PROMPTS), seeds)
    names, b = _ffn_names(pipe.unet), len(PROMPTS)
    modules = dict(pipe.unet.named_modules())
    halves = lambda run, rows: [run[n][:, rows].transpose(0, 1) for n in names]
    return {
        "names": names,
        "weights": [modules[n].weight.detach() for n in names],
        "cond": halves(prompt_run, slice(b, None)),
        "uncond": halves(prompt_run, slice(None, b)),
        "null_cond": halves(empty_run, slice(b, None)),
        "null_uncond": halves(empty_run, slice(None, b)),
    }


def _ffn_names(unet) -> list[str]:
    """ff.net.2 layers in forward order: down blocks, mid block, up blocks (written independently of memloc.ffn)."""
    names = [n for n, _ in unet.named_modules() if n.endswith("ff.net.2")]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (rank[n.split(".")[0]], names.index(n)))


def hooked_statistics(pipe, prompts, seeds, *, normalize=False):
    """Per UNet call (timestep) and layer: float64 sums over tokens of h**2 per sample, via the pipeline's __call__.

    Returns ``{name: [T, 2B, d_in]}``; rows ``:B`` are the unconditional half, ``B:`` the conditional one.
    """
    names = _ffn_names(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    calls: list[dict] = []
    handles = [pipe.unet.register_forward_pre_hook(lambda m, a: calls.append({}))]

    def hook_for(name):
        def hook(module, args):
            h = args[0].double()
            if normalize:
                h = F.normalize(h, p=2, dim=-1)
            calls[-1][name] = h.pow(2).sum(dim=1)

        return hook

    handles += [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]

    def stop(p, i, t, kwargs):
        if i == TAU:
            p._interrupt = True
        return kwargs

    try:
        pipe(
            list(prompts),
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="latent",
            callback_on_step_end=stop,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == TAU + 1
    return {n: torch.stack([c[n] for c in calls]) for n in names}


def assert_stats_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 sums of squares (fused kernels, any backend) against the float64 hook sums."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6 * scale)


def reference_masks(weights, signal, null, subsets, sparsity):
    """Eq. 2-7 in plain float64 PyTorch: per layer ``[S, d_out, d_in]`` bool."""
    masks = []
    for w, sig, nul in zip(weights, signal, null):
        d_in = w.shape[1]
        k = max(1, math.floor(sparsity * d_in + 1e-9))
        per_subset = []
        for subset in subsets:
            union = torch.zeros(w.shape, dtype=torch.bool)
            for t in range(sig.shape[1]):
                s_norm = sig[subset, t].sum(0).sqrt()
                n_norm = nul[subset, t].sum(0).sqrt()
                score = w.double().abs() * s_norm  # eq. 2/4
                null_score = w.double().abs() * n_norm
                top = torch.zeros_like(union).scatter_(1, score.topk(k, dim=1).indices, True)  # eq. 5
                union |= top & (score > null_score)  # eq. 6, then eq. 7 over t
            per_subset.append(union)
        masks.append(torch.stack(per_subset))
    return masks


def test_statistics_equal_hook_based_sums(collected, hooked):
    stats = load_stats(collected)
    assert [layer["name"] for layer in stats.layers] == hooked["names"]
    for branch in ("cond", "uncond", "null_cond", "null_uncond"):
        for cols, expected in zip(stats.layer_columns(), hooked[branch]):
            assert_stats_close(stats.tensors[branch][:, :, cols], expected)


@pytest.mark.parametrize(
    ("null", "sparsity", "subsets"),
    [("uncond", 0.05, SUBSETS), ("empty", 0.1, [[0, 1, 2, 3]])],
    ids=["uncond-null-3-subsets", "empty-prompt-null-all-prompts"],
)
def test_masks_equal_hook_based_eq_2_to_7(collected, hooked, tmp_path, null, sparsity, subsets):
    mask_path = localize(collected, tmp_path / "m.safetensors", sparsity=sparsity, subsets=subsets, null=null,
                         progress=False)
    null_stats = hooked["uncond"] if null == "uncond" else hooked["null_cond"]
    expected = reference_masks(hooked["weights"], hooked["cond"], null_stats, subsets, sparsity)
    got = read_mask_file(mask_path)
    assert got.n_subsets == len(subsets) and got.meta["subsets"] == subsets and got.meta["null"] == null
    assert sum(int(e.sum()) for e in expected) > 0
    for name, mask, exp in zip(hooked["names"], got.masks, expected):
        assert_masks_equal(mk.unpack_mask(mask), exp, name)


def test_authors_mode_matches_normalized_pooled_empty_prompt_reference(model_dir, prompt_file, pipe, tmp_path):
    stats_path = collect_statistics(
        prompt_file, tmp_path / "s.safetensors", model=model_dir, batch_size=len(PROMPTS), steps=STEPS,
        timesteps=TAU, guidance_scale=GUIDANCE, seed=3, compat="authors", device="cpu", progress=False,
    )
    mask_path = localize(stats_path, tmp_path / "m.safetensors", sparsity=0.1, progress=False)
    names = _ffn_names(pipe.unet)
    seeds = [3] * len(PROMPTS)  # the authors' code reseeds with one seed for every prompt
    prompt_stats = hooked_statistics(pipe, PROMPTS, seeds, normalize=True)
    empty_stats = hooked_statistics(pipe, [""], [3], normalize=True)
    pooled = [prompt_stats[n].sum(1, keepdim=True).transpose(0, 1) for n in names]  # both halves, all prompts
    null = [empty_stats[n].sum(1, keepdim=True).transpose(0, 1) * len(PROMPTS) for n in names]
    modules = dict(pipe.unet.named_modules())
    expected = reference_masks([modules[n].weight.detach() for n in names], pooled, null, [[0]], 0.1)
    got = read_mask_file(mask_path)
    assert got.meta["null"] == "empty" and got.meta["compat"] == "authors"
    assert sum(int(e.sum()) for e in expected) > 0
    for name, mask, exp in zip(names, got.masks, expected):
        assert_masks_equal(mk.unpack_mask(mask), exp, name)


def test_resumed_collection_equals_uninterrupted(model_dir, prompt_file, tmp_path, monkeypatch, capsys):
    import memloc.collect as collect

    args = ["collect", "--model", str(model_dir), "--prompts", str(prompt_file), "--steps", str(STEPS),
            "--timesteps", str(TAU), "--batch-size", "2", "--null", "empty", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "whole.safetensors")]) == 0

    real, calls = collect._denoise_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(collect, "_denoise_batch", interrupted)
    out = tmp_path / "resumed.safetensors"
    assert cli.main([*args, "--out", str(out)]) == 130
    assert not out.exists() and (tmp_path / "resumed.safetensors.partial").exists()
    monkeypatch.setattr(collect, "_denoise_batch", real)
    counted = []
    monkeypatch.setattr(collect, "_denoise_batch", lambda *a, **k: counted.append(1) or real(*a, **k))
    assert cli.main([*args, "--out", str(out)]) == 0
    assert len(counted) == 1 + 2  # the lost batch, then the 2 null batches
    assert not (tmp_path / "resumed.safetensors.partial").exists()
    whole, resumed = load_stats(tmp_path / "whole.safetensors"), load_stats(out)
    assert whole.tensors.keys() == resumed.tensors.keys()
    for name in whole.tensors:
        assert torch.equal(whole.tensors[name], resumed.tensors[name]), name
    assert {k: v for k, v in whole.meta.items()} == {k: v for k, v in resumed.meta.items()}


def test_prune_then_undo_restores_weights_bit_for_bit(collected, pipe, tmp_path):
    mask = read_mask_file(localize(collected, tmp_path / "m.safetensors", sparsity=0.2, n_subsets=3, subset_size=2,
                                   progress=False))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pruning = apply_masks(pipe.unet, mask)
    union = [mk.unpack_mask(m).any(0) for m in mask.masks]
    assert pruning.count == sum(int(u.sum()) for u in union) > 0
    for layer, u in zip(pruning.layers, union):
        w = layer.linear.weight
        assert bool((w[u] == 0).all())
        assert torch.equal(w[~u], before[layer.name + ".weight"][~u])
    pruning.undo()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value.view(torch.int32), before[key].view(torch.int32)), key


def build_tiny_sdxl(tokenizer_dir):
    """An SDXL pipeline (two CLIP encoders, text_time embedding, Euler) at tiny widths with random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(2)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )


def test_sdxl_statistics_equal_hooked_pipeline_call(tmp_path):
    sdxl = build_tiny_sdxl(write_char_tokenizer(tmp_path / "tokenizer"))
    prompts = PROMPTS[:2]
    stats = load_stats(collect_statistics(
        prompts, tmp_path / "s.safetensors", pipe=sdxl, batch_size=2, steps=STEPS, timesteps=TAU, seed=SEED,
        guidance_scale=GUIDANCE, progress=False,
    ))
    assert stats.meta["pipeline"] == "StableDiffusionXLPipeline" and len(stats.layers) == 8
    run = hooked_statistics(sdxl, prompts, [SEED, SEED + 1])
    names = _ffn_names(sdxl.unet)
    assert [layer["name"] for layer in stats.layers] == names
    for cols, name in zip(stats.layer_columns(), names):
        assert_stats_close(stats.tensors["cond"][:, :, cols], run[name][:, 2:].transpose(0, 1))
        assert_stats_close(stats.tensors["uncond"][:, :, cols], run[name][:, :2].transpose(0, 1))
