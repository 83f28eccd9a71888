"""The model tests import the training script's modules (``scripts/train_shapes.py`` and its siblings), which
live beside the library, not in it: put ``scripts/`` on ``sys.path`` for them."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
