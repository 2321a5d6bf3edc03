"""The public reference's script, kept so its commands run unchanged:
`python train_eva_reproduction.py --chunked_embeddings_dir D
--output_dir O --batch_size 8 --num_epochs 10 [--overfit_test_size 10] [--debug_mode]
[--model_size base] [--training_mode patch_only]` runs `eva-repro train` (same code, same flags;
see `eva-repro train -h`). Works under torchrun too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without pip install

from eva_repro.cli import main  # noqa: E402  (user errors: one line, exit 2)

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
