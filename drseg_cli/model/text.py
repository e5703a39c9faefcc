"""Remote-sensing prompt templates and class text embeddings.

A class is embedded as the mean, over all its names (name + synonyms) × all templates, of the
L2-normalised CLIP text embeddings, renormalised (the usual prompt ensemble, CLIP §3.1.4).

Template sources: the RESISC45 and EuroSAT prompt lists of OpenAI CLIP
(github.com/openai/CLIP, ``data/prompts.md``: "satellite imagery of {}.", "aerial photo of
a {}.", "a centered satellite photo of {}.", ...), plus our own remote-sensing phrasings
("a remote sensing image of many {}.", "an aerial photograph of {}.", ...). They are
deliberately about overhead imagery: per-patch features of aerial tiles match them better
than ImageNet's object-centric templates.

``IMAGENET_TEMPLATES`` are OpenAI CLIP's 80 ImageNet templates (``notebooks/Prompt_
Engineering_for_ImageNet.ipynb``), in the order SegEarth-OV uses them
(``prompts/imagenet_template.py``, ``openai_imagenet_template``); ``--method segearth`` prompts
with them. ``embed_queries`` keeps one embedding per name instead of one per class, for
SegEarth-OV's per-synonym queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

TEMPLATES: tuple[str, ...] = (
    # OpenAI CLIP, data/prompts.md (RESISC45)
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
    # OpenAI CLIP, data/prompts.md (EuroSAT)
    "a centered satellite photo of {}.",
    # drseg's own
    "a satellite image of a {}.",
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "an aerial photograph of a {}.",
    "a remote sensing image of {}.",
    "a remote sensing image of many {}.",
    "a remote sensing image of a {}.",
    "a top-down aerial view of {}.",
    "a high resolution satellite image showing {}.",
)

#: OpenAI CLIP's 80 ImageNet templates, as SegEarth-OV's ``openai_imagenet_template``.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: Prompts encoded per text-encoder call (bounds memory for long class lists).
PROMPT_BATCH = 256


def build_prompts(
    class_prompts: Sequence[Sequence[str]], templates: Sequence[str] = TEMPLATES
) -> tuple[list[str], torch.Tensor]:
    """All prompts (names × templates, class by class) and the class index of each."""
    if not templates:
        raise ValueError("no prompt templates")
    prompts: list[str] = []
    owner: list[int] = []
    for k, names in enumerate(class_prompts):
        if isinstance(names, str) or not names:
            raise ValueError(f"class {k}: give a non-empty sequence of names, got {names!r}")
        for name in names:
            prompts.extend(t.format(name) for t in templates)
            owner.extend([k] * len(templates))
    return prompts, torch.tensor(owner, dtype=torch.long)


def embed_classes(
    encode: Callable[[list[str]], torch.Tensor],
    class_prompts: Sequence[Sequence[str]],
    templates: Sequence[str] = TEMPLATES,
    *,
    batch_size: int = PROMPT_BATCH,
) -> torch.Tensor:
    """``[K, D]`` float32, L2-normalised: per class the renormalised mean of the normalised
    embeddings of every (name, template) prompt. ``encode`` maps prompts to ``[n, D]``."""
    if not class_prompts:
        raise ValueError("no classes to embed")
    prompts, owner = build_prompts(class_prompts, templates)
    chunks = [
        F.normalize(encode(prompts[i : i + batch_size]).float(), dim=-1)
        for i in range(0, len(prompts), batch_size)
    ]
    each = torch.cat(chunks)
    sums = torch.zeros(len(class_prompts), each.shape[1], dtype=each.dtype, device=each.device)
    sums.index_add_(0, owner.to(each.device), each)
    return F.normalize(sums, dim=-1)


def embed_queries(
    encode: Callable[[list[str]], torch.Tensor],
    class_prompts: Sequence[Sequence[str]],
    templates: Sequence[str] = TEMPLATES,
    *,
    batch_size: int = PROMPT_BATCH,
) -> torch.Tensor:
    """``[K, S, D]``: one embedding per name (the template ensemble of that name alone), S the
    most names of any class; shorter classes repeat their first name, which leaves any max over
    a class's names unchanged (SegEarth-OV's per-synonym queries, merged by max)."""
    if not class_prompts:
        raise ValueError("no classes to embed")
    for k, entry in enumerate(class_prompts):
        if isinstance(entry, str) or not entry:
            raise ValueError(f"class {k}: give a non-empty sequence of names, got {entry!r}")
    names = [name for entry in class_prompts for name in entry]
    each = embed_classes(encode, [[n] for n in names], templates, batch_size=batch_size)
    width = max(len(entry) for entry in class_prompts)
    index, start = [], 0
    for entry in class_prompts:
        own = list(range(start, start + len(entry)))
        index.append(own + own[:1] * (width - len(own)))
        start += len(entry)
    return each[torch.tensor(index, device=each.device)]


class TextEmbeddingCache:
    """Class embeddings keyed by (class prompts, templates): computed once per run."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._store: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(
        class_prompts: Sequence[Sequence[str]], templates: Sequence[str], extra: object = ()
    ) -> tuple:
        # Tensors made in inference mode cannot join autograd later: keep the two apart.
        return (
            tuple(tuple(names) for names in class_prompts),
            tuple(templates),
            torch.is_inference_mode_enabled(),
            extra,
        )

    def get(
        self,
        class_prompts: Sequence[Sequence[str]],
        templates: Sequence[str],
        compute: Callable[[], torch.Tensor],
        extra: object = (),
    ) -> torch.Tensor:
        """The cached embedding for this key, computing it with ``compute`` on a miss;
        ``extra`` adds to the key (e.g. a weights version)."""
        key = self.key(class_prompts, templates, extra)
        if key not in self._store:
            if len(self._store) >= self.max_entries:
                self._store.pop(next(iter(self._store)))
            self._store[key] = compute().detach()
        return self._store[key].clone()

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)
