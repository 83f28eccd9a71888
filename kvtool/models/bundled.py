"""The trained models shipped inside the kvtool package, found by name.

``BUNDLED_MODELS`` maps a name (``kvtool-shapes``) to its checkpoint directory and a one-line description;
``model_path(name_or_path)`` turns a bundled name into its directory and leaves anything else as given (an
existing path always wins over a name). ``kvtool-shapes`` was trained by ``scripts/train_shapes.py`` (not part of
the package; its ``TRAINING.json`` records the run), its prompt and chat template are the ``shapes`` task's
(``kvtool.evals.shapes``). It does not load, build or train models.
"""

from __future__ import annotations

from pathlib import Path

SHAPES_MODEL_DIR = Path(__file__).parent / "data" / "kvtool-shapes"

BUNDLED_MODELS: dict[str, tuple[Path, str]] = {
    "kvtool-shapes": (SHAPES_MODEL_DIR, "LLaVA-1.5 architecture, 0.8 M parameters, trained on the shapes task "
                                        "(99.8 % test accuracy); HF checkpoint for --backend torch or export"),
}


def model_path(name_or_path: str) -> str:
    """The directory of bundled model ``name_or_path``, or ``name_or_path`` itself when it is an existing path
    or not a bundled name."""
    if not Path(name_or_path).exists() and name_or_path in BUNDLED_MODELS:
        return str(BUNDLED_MODELS[name_or_path][0])
    return name_or_path
