"""Seed-compatible entry point: `python extract_embeddings.py --input_dir D --output_dir O
--batch_size 32` runs `eva-repro extract` (same code, same flags; see `eva-repro extract -h`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without pip install

from eva_repro.cli import main  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main(["extract", *sys.argv[1:]]))
    except ValueError as e:  # user errors: one line, exit 2 (as the eva-repro CLI does)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
