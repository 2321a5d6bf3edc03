"""The test bed: judge any DiT (`eva-repro check`), and the bug zoo that proves it can fail."""
