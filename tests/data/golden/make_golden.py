"""Regenerate the stored outputs of tests/test_golden.py (open_clip-style regression data).

    python tests/data/golden/make_golden.py

Run it only when a change to the outputs is intended, and say why in the commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.golden_case import GOLDEN, run_golden_case  # noqa: E402


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mask, probs, fingerprint = run_golden_case(Path(tmp))
    np.savez_compressed(GOLDEN.with_suffix(".npz"), mask=mask, probs=probs)
    GOLDEN.with_suffix(".json").write_text(json.dumps({"weights_fingerprint": fingerprint}))
    print(f"wrote {GOLDEN}.npz/.json: mask {mask.shape}, fingerprint {fingerprint}")


if __name__ == "__main__":
    main()
