"""Images for transformers vision models: which checkpoints are vision models, their processor,
where each image's tokens go in a prompt, and the pixel inputs `generate` takes beside the ids.

The prompt is still rendered and tokenized by Confab (message text stays text, never control
tokens): the processor's chat template writes one image token per picture as template text,
and each is replaced by that picture's own token span, which the processor makes from the
image token alone (so no user text ever passes through it). Spans are cached by picture.
Pixels are made on the inference thread, only for the pictures whose tokens are not already in
the conversation's KV cache. Knows transformers (imported lazily), not Gradio or callers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, NamedTuple

from .base import BackendError, ImageData, ParamError
from .images import decode

# Vision models whose positions are plain token counts, so a KV cache that already holds a
# conversation's pictures can be reused for its next turn without their pixels. Others (Qwen2-VL's
# M-RoPE derives positions from the pictures) re-read a conversation with pictures in full.
CACHE_SAFE = {"idefics2", "idefics3", "smolvlm", "llava"}
SPAN_CACHE = 64  # pictures whose token spans are kept (a few ints each)
ID_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}


class Placed(NamedTuple):
    """One picture in a prompt: its tokens are token_ids[start:end]."""

    image: ImageData
    start: int
    end: int


def is_vision(path: str, files: dict[str, Any], transformers: Any) -> bool:
    """Whether the checkpoint at `path` is an image-text-to-text model (by its config alone)."""
    if files.get("gguf_file"):
        return False  # transformers reads GGUF text models only
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(path, **files)
    except (OSError, ValueError):
        return False  # loading the model says what is wrong
    return hasattr(config, "vision_config") and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


class Vision:
    """A loaded vision model's processor: image token spans and pixel inputs."""

    def __init__(self, processor: Any, model_type: str) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template = getattr(processor, "chat_template", None)
        self.cache_safe = model_type in CACHE_SAFE
        self.image_token = getattr(processor, "image_token", None)
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        if not isinstance(token_id, int) or token_id == self.tokenizer.unk_token_id:
            raise BackendError(f"This model's processor names no image token ({self.image_token!r}), so Confab cannot "
                               "tell where its pictures go.")
        self.image_token_id = token_id
        self._spans: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str, files: dict[str, Any], transformers: Any) -> "Vision":
        processor = transformers.AutoProcessor.from_pretrained(path, **files)
        config = transformers.AutoConfig.from_pretrained(path, **files)
        return cls(processor, config.model_type)

    def place(self, ids: list[int], public: int, images: list[ImageData]) -> tuple[list[int], int, tuple[Placed, ...]]:
        """Each image token the template wrote, replaced by its picture's span. Returns the ids,
        the public opening (which ends before the first picture) and where each picture is."""
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(at) != len(images):
            raise BackendError(f"The chat template placed {len(at)} picture(s) for the {len(images)} in this "
                               "conversation; use the model's own chat template to send pictures.")
        out: list[int] = []
        placed: list[Placed] = []
        last = 0
        for pos, image in zip(at, images):
            out += ids[last:pos]
            span = self.span(image)
            placed.append(Placed(image, len(out), len(out) + len(span)))
            out += span
            last = pos + 1
        out += ids[last:]
        return out, min([public, *at[:1]]), tuple(placed)

    def span(self, image: ImageData) -> list[int]:
        """The token ids the processor puts where this picture is (cached by picture)."""
        key = image.digest
        with self._lock:
            if key in self._spans:
                self._spans.move_to_end(key)
                return self._spans[key]
        out = self._process([image])
        span = [int(t) for t in out["input_ids"][0]]
        with self._lock:
            self._spans[key] = span
            while len(self._spans) > SPAN_CACHE:
                self._spans.popitem(last=False)
        return span

    def pixels(self, placed: list[Placed], model: Any) -> dict[str, Any]:
        """What `generate` takes beside the ids for these pictures (pixel values and their masks
        or sizes), on the model's device, floats in its dtype."""
        if not placed:
            return {}
        out = self._process([p.image for p in placed], tensors=True)
        inputs = {}
        for key, value in out.items():
            if key in ID_INPUTS or not hasattr(value, "to"):
                continue
            value = value.to(model.device)
            inputs[key] = value.to(model.dtype) if value.is_floating_point() else value
        return inputs

    def _process(self, images: list[ImageData], tensors: bool = False) -> Any:
        pictures = [decode(i) for i in images]
        try:
            return self.processor(text=[self.image_token * len(pictures)], images=[pictures],
                                  add_special_tokens=False, **({"return_tensors": "pt"} if tensors else {}))
        except (ValueError, TypeError, OSError) as e:
            raise ParamError(f"The model's processor could not read {images[0].name or 'a picture'} ({e}).") from e


def cache_keys(ids: list[int], placed: tuple[Placed, ...]) -> list[int]:
    """The ids with each picture's first token made unique to that picture, so two pictures of the
    same size (the same span of ids) never share a cached prefix."""
    if not placed:
        return ids
    keys = list(ids)
    for p in placed:
        keys[p.start] = -1 - int(p.image.digest[:15], 16)  # negative: never a real token id
    return keys


def reusable(reuse: int, placed: tuple[Placed, ...], cache_safe: bool) -> tuple[int, list[Placed]]:
    """How much of a cached prefix can be kept, and the pictures whose pixels the model must then
    read: a picture is either wholly in the cache or wholly read again, never cut."""
    if not placed:
        return reuse, []
    if not cache_safe:
        return 0, list(placed)
    for p in placed:
        if p.start < reuse < p.end:
            reuse = p.start
    return reuse, [p for p in placed if p.start >= reuse]
