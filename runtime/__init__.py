"""The runtime library shared by training, export and serving: architectures (`runtime.models`),
the model checkpoint format, precision and device helpers, tiled inference and self-ensemble,
image-quality metrics (`runtime.metrics`) and inference runners (`runtime.runners`).
It imports only data_pipeline, never train/, export/ or serve_bench/."""
