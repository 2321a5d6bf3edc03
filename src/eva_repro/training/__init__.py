"""`eva-repro train`: the trainer (`train`), its options (`train_config`), the optimiser and EMA
(`optim`), what a new model takes from its training rows (`init_from_data`), metrics and logs
(`monitoring`)."""
