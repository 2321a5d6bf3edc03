"""What every stage shares: user errors, atomic files, locks, progress, signals, flags, devices,
torchrun plumbing, counter-based random numbers. Imports nothing else from eva_repro."""
