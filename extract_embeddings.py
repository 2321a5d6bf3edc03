"""The public reference's script, kept so its commands run unchanged:
`python extract_embeddings.py --input_dir D --output_dir O
--batch_size 32` runs `eva-repro extract` (same code, same flags; see `eva-repro extract -h`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without pip install

from eva_repro.cli import main  # noqa: E402  (user errors: one line, exit 2)

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
