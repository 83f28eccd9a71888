"""The training-only auxiliary objectives of the kvtool-shapes training script (``scripts/train_shapes.py``).

``patch_targets`` (per-patch object classes from the generator's ground truth), ``_PatchProbe`` (a linear head
on the vision tower's patch features) and ``_MentionProbe`` (a linear head on a middle language-model layer at
the tokens that name an object). Neither head is saved with the checkpoint. Research code beside the library.
"""

from __future__ import annotations

from typing import Any

POSITION_BINS = 10  # object centre x and y, each in 10 bins of 9 px (= RELATION_MIN_DX: left/right pairs differ)


def patch_targets(samples: list[dict], grid: int):
    """Per-patch classes for the auxiliary vision objective: ``[len(samples), grid*grid, 4]`` int64 (patches
    row-major, like the tower's patch tokens) holding colour, shape, x bin and y bin of the object the patch
    belongs to. A patch belongs to an object when its centre lies within the object's radius + half a patch;
    where two objects claim it, to the one whose outline is nearer. Other patches are background: colour
    ``len(COLORS)``, shape ``len(SHAPES)``, position ``-100`` (ignored)."""
    import numpy as np
    import torch

    from kvtool.evals.shapes import COLORS, IMAGE_SIZE, SHAPES

    colors, shapes = list(COLORS), list(SHAPES)
    step = IMAGE_SIZE / grid
    centre = (np.arange(grid) + 0.5) * step
    cy, cx = (a.reshape(-1) for a in np.meshgrid(centre, centre, indexing="ij"))
    out = np.empty((len(samples), grid * grid, 4), dtype=np.int64)
    out[...] = (len(colors), len(shapes), -100, -100)
    for b, s in enumerate(samples):
        best = np.full(grid * grid, np.inf)
        for o in s["objects"]:
            gap = np.hypot(cx - o["x"], cy - o["y"]) - o["r"]  # distance from the patch centre to the outline
            m = (gap < step / 2) & (gap < best)
            best[m] = gap[m]
            out[b, m] = (colors.index(o["color"]), shapes.index(o["shape"]),
                         min(int(o["x"] * POSITION_BINS / IMAGE_SIZE), POSITION_BINS - 1),
                         min(int(o["y"] * POSITION_BINS / IMAGE_SIZE), POSITION_BINS - 1))
    return torch.from_numpy(out)


class _PatchProbe:
    """Training-only auxiliary objective on the vision tower (the role CLIP pre-training plays for LLaVA): every
    patch feature the projector reads (the tower's last hidden state, CLS dropped) must give, through one linear
    head, the colour, shape and coarse x/y position of the object the patch belongs to, or "background"
    (``patch_targets``; the generator's ground truth is the label). Per patch rather than pooled over the object:
    the language model finds "the triangle" by matching its question against image tokens, so each token of an
    object must carry the whole object's description, which only the tower's attention can gather. Features are
    captured with a forward hook, so the model's forward is unchanged; the head is not saved with the checkpoint.
    """

    def __init__(self, model):
        import torch

        from kvtool.evals.shapes import COLORS, SHAPES

        vc = model.config.vision_config
        self.grid = vc.image_size // vc.patch_size
        self.sizes = (len(COLORS) + 1, len(SHAPES) + 1, POSITION_BINS, POSITION_BINS)
        self.head = torch.nn.Linear(vc.hidden_size, sum(self.sizes))
        self.features = None
        self.handle = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.features = output.hidden_states[-1][:, 1:] if output.hidden_states is not None else None

    def _logits(self, samples: list[dict]):
        """Head logits (colour, shape, x, y) of every patch of the last tower call, and the targets."""
        import torch

        return torch.split(self.head(self.features), self.sizes, dim=-1), patch_targets(samples, self.grid).unbind(-1)

    def loss(self, samples: list[dict]):
        """Sum of the four cross-entropies, each the mean over the patches it labels; the last tower call."""
        import torch

        logits, targets = self._logits(samples)
        return sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), t.flatten(), ignore_index=-100)
                   for lg, t in zip(logits, targets, strict=True))

    def accuracy(self, samples: list[dict]) -> list[float]:
        """Per-target accuracy (colour, shape, x, y) over the patches that belong to an object, for the log."""
        import torch

        with torch.no_grad():
            logits, targets = self._logits(samples)
            on = targets[2] != -100
            return [round(float((lg.argmax(-1)[on] == t[on]).float().mean()), 3)
                    for lg, t in zip(logits, targets, strict=True)]


class _MentionProbe:
    """Training-only auxiliary objective on the language model: where a question names an object ("the red
    circle"), the output of layer ``layer`` at the name's last token must give that object's centre x through
    one linear head (regression on x scaled to [-1, 1]; ``encode_questions`` gives positions and targets), with
    the sign flipped for the object a left/right question compares against.

    Why a probe, and why the sign: docs/SHAPES_TRAINING.md ("Notes from
    the training code" and session 4). Written by hand (no library trains such
    probes); not saved.
    """

    def __init__(self, model, layer: int):
        import torch

        self.layer = layer
        self.head = torch.nn.Linear(model.config.text_config.hidden_size, 1)

    def loss(self, hidden, start: int, enc: dict[str, Any]):
        """Mean squared error over the batch's mentions (0 when it has none)."""
        import torch

        from kvtool.evals.shapes import IMAGE_SIZE

        pos = enc["mention_pos"]
        if not len(pos):
            return hidden.sum() * 0.0
        pred = self.head(hidden[pos[:, 0], pos[:, 1] - start]).squeeze(-1)
        return torch.nn.functional.mse_loss(pred, enc["mention_sign"] * (enc["mention_x"] * (2.0 / IMAGE_SIZE) - 1.0))
