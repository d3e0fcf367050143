"""The training library: config, the Trainer loop and its parts (optimizer and schedule,
training state, distributed helpers, progress, MLflow tracking). The commands are one folder up."""
