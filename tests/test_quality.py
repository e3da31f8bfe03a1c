"""The trained demo models draw the digit they are asked for, judged by the digit classifier.

Two images per digit, 20 Euler steps, cfg 3, through ComfyUI's comfy.sample.sample (bench/quality.py's
`generate`); the full measurement is `.venv/bin/python -m bench.quality`.
"""
import pytest
import torch

from bench import quality

MIN_ACCURACY = {"unet_large": 0.8, "dit_large": 0.8, "unet_small": 0.6, "dit_small": 0.6}
# The UNets' share of clean samples here: 85% both with the min-SNR-5 weights, 65% and 70% with the unweighted ones.
MIN_CLEAN = {"unet_large": 0.75, "unet_small": 0.75}


@pytest.fixture(scope="module")
def classifier(stride):
    return stride("demo.classifier").load()


def test_every_model_has_a_threshold(stride):
    assert set(MIN_ACCURACY) == set(stride("nodes.neural_models").SPECS)


def test_classifier_is_accurate_on_held_out_digits(stride, classifier):
    split = stride("demo.train").digits_split()
    assert len(split.held_y) == 360 and len(split.train_y) == 1437
    assert classifier.accuracy(split.held_x, split.held_y) >= 0.9
    # The features the Frechet distance uses separate real digits from noise.
    real = classifier.features(split.held_x[:100]).detach()
    noise = classifier.features(torch.randn(100, 4, 8, 8)).detach()
    assert quality.frechet_distance(real, noise) > 10 * quality.frechet_distance(
        real, classifier.features(split.train_x[:100]).detach())


@pytest.mark.parametrize("name", list(MIN_ACCURACY))
def test_trained_model_draws_the_requested_digits(stride, classifier, name):
    x, labels, _, params = quality.generate(name, seeds=[0, 1], steps=20)
    assert x.shape == (20, 4, 8, 8) and params > 0
    assert torch.isfinite(x).all()
    accuracy = classifier.accuracy(x, labels)
    assert accuracy >= MIN_ACCURACY[name], \
        f"{name}: the classifier recognizes {accuracy:.0%} of its digits (predicted {classifier.predict(x).tolist()})"
    clean = quality.clean_share(x, stride("demo.train").digits_split())
    assert clean >= MIN_CLEAN.get(name, 0.0), f"{name}: {clean:.0%} of its samples are clean (salt-and-pepper noise)"


def test_the_unets_are_trained_with_min_snr_weighting(stride):
    """Min-SNR-gamma weighs the EPS loss by min(SNR, gamma) / SNR, SNR = 1 / sigma^2 for x = x0 + sigma eps; the
    shipped UNets' metadata names the weighting they were trained with."""
    train = stride("demo.train")
    sigma = torch.tensor([0.03, 0.2, 0.44, 0.45, 1.0, 14.6])
    snr = sigma.pow(-2)
    assert torch.allclose(train.MinSNR(5.0)(sigma), snr.clamp(max=5.0) / snr)
    for name in MIN_CLEAN:
        weighting = train.PLAN[name]["weighting"]
        assert weighting.gamma == 5.0
        assert stride("nodes.neural_models").weights_metadata(name)["weighting"] == repr(weighting)


def test_clean_share_counts_salt_and_pepper_samples(stride):
    """The clean share: 95% of real held-out digits by construction, near all of the training digits, and it drops
    with the share of digits given salt-and-pepper noise (a few latent elements set far out)."""
    split = stride("demo.train").digits_split()
    assert abs(quality.clean_share(split.held_x, split) - quality.CLEAN_QUANTILE) < 0.01
    assert quality.clean_share(split.train_x[:200], split) == 1.0
    digits = split.held_x[:200].clone()
    gen = torch.Generator().manual_seed(0)
    noisy = digits[:100].flatten(1)
    idx = torch.randint(0, noisy.shape[1], (100, 12), generator=gen)
    noisy.scatter_(1, idx, 3 * torch.sign(torch.randn(100, 12, generator=gen)))
    digits[:100] = noisy.view_as(digits[:100])
    assert quality.clean_share(digits, split) < 0.6 < quality.clean_share(split.held_x[:200], split)
