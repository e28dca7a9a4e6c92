"""Embeddings: the seed embedding is fitted deterministically on the seeds alone, cached as
safetensors by their key, and tells held-out phantoms from noise; a user's transformers model loads
from a local folder (safetensors only) and a folder that cannot be used says why in one line."""

from __future__ import annotations

import numpy as np
import pytest

from dermt2im.fidelity import embeddings
from dermt2im.fidelity.embeddings import EmbeddingError, model_embedding, seed_embedding, seed_embedding_key
from dermt2im.phantoms import render_phantom

LABELS = ("benign", "malignant")


def phantom(i: int) -> np.ndarray:
    return render_phantom(LABELS[i % 2], np.random.default_rng([21, i]), size=64)


@pytest.fixture(scope="module")
def seeds():
    return {f"s{i}": phantom(i) for i in range(16)}


def train_rows(seeds):
    return [(sid, f"pk-{sid}", LABELS[int(sid[1:]) % 2]) for sid in seeds]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, seeds):
    folder = tmp_path_factory.mktemp("embeddings")
    return folder, seed_embedding(folder, train_rows(seeds), seeds.__getitem__)


def test_the_seed_embedding_is_cached_by_the_seeds_key(fitted, seeds, monkeypatch):
    folder, emb = fitted
    key = seed_embedding_key(train_rows(seeds))
    saved = folder / f"seed-cnn-{key[:16]}"
    assert (saved / "model.safetensors").is_file() and (saved / "meta.json").is_file()
    assert emb.name == "seed-cnn" and emb.identity == f"seed:{key}" and emb.dimensions == sum(embeddings.CHANNELS)

    def no_fit(*_a, **_k):
        raise AssertionError("fitted again although cached")

    monkeypatch.setattr(embeddings, "fit_seed_network", no_fit)
    again = seed_embedding(folder, train_rows(seeds), seeds.__getitem__)
    probe = [phantom(99), phantom(100)]
    assert np.array_equal(again.embed(probe), emb.embed(probe))
    other = train_rows(seeds)[:-1]
    assert seed_embedding_key(other) != key  # other seeds, another embedding


def test_the_seed_fit_is_deterministic(seeds, monkeypatch):
    monkeypatch.setattr(embeddings, "STEPS", 10)
    images, labels = list(seeds.values())[:8], [LABELS[i % 2] for i in range(8)]
    a, _ = embeddings.fit_seed_network(images, labels)
    b, _ = embeddings.fit_seed_network(images, labels)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_the_seed_embedding_puts_real_images_near_the_seeds_and_noise_far(fitted, seeds):
    _, emb = fitted
    ref = emb.embed(list(seeds.values()))
    held = emb.embed([phantom(i) for i in range(200, 208)])
    noise = emb.embed([np.random.default_rng(i).integers(0, 256, (64, 64, 3)).astype(np.uint8) for i in range(8)])
    nearest = lambda x: np.linalg.norm(x[:, None] - ref[None], axis=2).min(1)  # noqa: E731
    assert nearest(held).max() < nearest(noise).min()


def save_tiny(kind: str, folder):
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8))
    else:
        model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    model.save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,dimensions", [("dinov2", 32), ("resnet", 16)])
def test_a_local_transformers_model_is_an_embedding(tmp_path, kind, dimensions):
    folder = save_tiny(kind, tmp_path / f"tiny-{kind}")
    emb = model_embedding(folder)
    out = emb.embed([phantom(1), phantom(2), phantom(3)])
    assert out.shape == (3, dimensions) and emb.dimensions == dimensions and np.isfinite(out).all()
    assert emb.name == f"tiny-{kind}" and emb.identity.startswith("model:")
    assert not np.allclose(out[0], out[1])


def test_a_folder_that_cannot_be_an_embedding_says_why(tmp_path):
    with pytest.raises(EmbeddingError, match="no such folder"):
        model_embedding(tmp_path / "nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(EmbeddingError, match="no config.json"):
        model_embedding(bare)
    (bare / "config.json").write_text("{}")
    (bare / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(EmbeddingError, match="pickled weights are never loaded"):
        model_embedding(bare)
