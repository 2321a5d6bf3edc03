"""What every stage shares: user errors, atomic files, locks, progress, signals, flags, devices,
torchrun plumbing. Imports nothing else from eva_repro."""
