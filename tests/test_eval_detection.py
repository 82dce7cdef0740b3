"""Wen et al.'s detection metric and inference-time mitigation on a tiny random pipeline."""

import numpy as np
import pytest
import torch

from memloc.eval.detection import detection_metric
from memloc.eval.mitigation import default_target_loss, mitigate_embeddings
from memloc.eval.sampling import encode_prompts, generate, initial_noise, seeds_for

PROMPTS = ["a red square on a blue field", "mona lisa"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_step_metric_equals_direct_unet_difference(tiny_pipe):
    # oracle: ||eps(x_T, T, e_p) - eps(x_T, T, e_null)||_2 from two separate UNet calls
    got = detection_metric(tiny_pipe, PROMPTS, samples=2, steps=4, max_steps=1, guidance=3.0)
    scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    expected = []
    with torch.no_grad():
        for p, prompt in enumerate(PROMPTS):
            x = scheduler.scale_model_input(initial_noise(tiny_pipe, seeds_for(p, 2)) * scheduler.init_noise_sigma, t)
            cond = encode_prompts(tiny_pipe, [prompt]).expand(2, -1, -1)
            null = encode_prompts(tiny_pipe, [""]).expand(2, -1, -1)
            eps_cond = tiny_pipe.unet(x, t, encoder_hidden_states=cond).sample
            diff = eps_cond - tiny_pipe.unet(x, t, encoder_hidden_states=null).sample
            expected.append(diff.flatten(1).norm(dim=1).mean().item())
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # the first step does not depend on the guidance scale; later steps do
    np.testing.assert_allclose(detection_metric(tiny_pipe, PROMPTS, samples=2, steps=4, max_steps=1, guidance=9.0), got)


def test_generation_matches_the_diffusers_pipeline(tiny_pipe):
    cond = encode_prompts(tiny_pipe, PROMPTS[:1])
    null = encode_prompts(tiny_pipe, [""])
    seeds = [11, 12]
    ours = generate(tiny_pipe, cond, null, [seeds], steps=3, guidance=5.0, batch_size=2)[0]
    theirs = tiny_pipe(
        prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2,
        latents=initial_noise(tiny_pipe, seeds), output_type="np",
    ).images
    diff = np.abs(ours.images.astype(int) - np.round(theirs * 255).astype(int))
    assert diff.max() <= 1, f"{(diff > 1).sum()} values differ by more than one level"
    assert ours.detection.shape == (2,) and np.all(ours.detection > 0)


def test_mitigation_lowers_the_detection_metric(tiny_pipe):
    cond = encode_prompts(tiny_pipe, PROMPTS)
    null = encode_prompts(tiny_pipe, [""])
    seeds = [seeds_for(p, 2) for p in range(len(PROMPTS))]
    with torch.no_grad():  # callers may sample under no_grad; the optimization must still work
        out = mitigate_embeddings(tiny_pipe, cond, null, seeds, steps=4, target_loss=0.0, max_iters=10, opt_samples=2)
    assert out.iterations == [10, 10]
    assert all(last < first for first, last in zip(out.first_loss, out.last_loss))
    torch.testing.assert_close(out.embeds[:, 0], cond[:, 0], rtol=0, atol=0)  # BOS untouched
    before = detection_metric(tiny_pipe, embeds=cond, samples=2, steps=4)
    after = detection_metric(tiny_pipe, embeds=out.embeds, samples=2, steps=4)
    assert np.all(after < before), f"detection before {before}, after mitigation {after}"


def test_mitigation_stops_at_the_target_loss(tiny_pipe):
    cond = encode_prompts(tiny_pipe, PROMPTS)
    null = encode_prompts(tiny_pipe, [""])
    seeds = [seeds_for(p, 2) for p in range(len(PROMPTS))]
    out = mitigate_embeddings(tiny_pipe, cond, null, seeds, steps=4, target_loss=1e9, opt_samples=2)
    assert out.iterations == [0, 0]
    torch.testing.assert_close(out.embeds, cond, rtol=0, atol=0)
    # a target between the two prompts' losses stops one prompt at once and optimizes the other
    middle = sum(out.first_loss) / 2
    split = mitigate_embeddings(tiny_pipe, cond, null, seeds, steps=4, target_loss=middle, opt_samples=2, max_iters=3)
    low = int(np.argmin(out.first_loss))
    assert split.iterations[low] == 0 and split.iterations[1 - low] > 0
    torch.testing.assert_close(split.embeds[low], cond[low], rtol=0, atol=0)


def test_default_target_keeps_wen_per_value_rms(tiny_pipe):
    # Wen et al.'s 3 on SD's 4x64x64 latent; the tiny UNet takes 4x8x8, 64 times fewer values: 3 / 8
    assert default_target_loss(tiny_pipe) == pytest.approx(3 / 8)
