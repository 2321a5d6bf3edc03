#!/usr/bin/env python
"""The public reference's script, kept so its commands run unchanged:
`python evaluate_model.py --model_path CKPT_OR_RUN_DIR
--embeddings_dir D --output_dir O --num_samples 1000` (the same flags as `eva-repro evaluate`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without pip install

from eva_repro.cli import main  # noqa: E402  (user errors: one line, exit 2)

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
