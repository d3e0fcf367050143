"""ONNX Runtime: TensorRT / CUDA execution providers on a GPU, the CPU provider otherwise; the
provider actually used is in describe() and in every row of the latency table. On a GPU provider
the input and output are bound to torch CUDA tensors (IO binding: no host round trip)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from data_pipeline.system import usable_cpus

from ..artifacts import read_meta
from ..tiling import tiled_forward
from . import Runner, RunnerUnavailable, register_runner


@register_runner("onnxruntime")
class OrtRunner(Runner):
    artifact, order = "onnx", 2

    def __init__(self, onnx_path: Path | str, device: str = "cpu", threads: int = 0, tile: int | None = None, overlap: int | None = None):
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise RunnerUnavailable(f"no ONNX model at {onnx_path}")
        meta = read_meta(onnx_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or usable_cpus()
        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
        if wanted and importlib.util.find_spec("tensorrt"):  # onnxruntime-gpu lists it even without TensorRT's libraries
            wanted.insert(0, "TensorrtExecutionProvider")
        if wanted and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch brought
        # fp32 means fp32 (no TF32 convolutions, as in TensorRT's FP32 engine), so that parity is meaningful
        cuda_options = {} if meta.get("fp16") else {"use_tf32": "0"}
        providers = [(p, cuda_options) if p == "CUDAExecutionProvider" else p for p in wanted if p in available]
        providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.device = torch.device("cuda" if self.provider != "CPUExecutionProvider" else "cpu")
        self.input_name, self.output_name = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name
        self.dtype = torch.float16 if "float16" in self.session.get_inputs()[0].type else torch.float32
        planes = self.session.get_outputs()[0].shape[1]
        self.out_planes = planes if isinstance(planes, int) else None  # None: as many as the input has
        self.tile = meta.get("tile", 0) if tile is None else tile
        self.overlap = meta.get("overlap", 16) if overlap is None else overlap
        self.threads = opts.intra_op_num_threads

    @classmethod
    def unavailable(cls, device):
        return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"

    @classmethod
    def open(cls, path, device="cpu", precision: str = "fp32", **options):
        return cls(path, device, **options)  # the graph's own dtype (fp32 or fp16 export) decides the precision

    @classmethod
    def variants(cls, device):
        return [("onnxruntime fp32", {})] + ([("onnxruntime fp16", {"precision": "fp16"})] if device.startswith("cuda") else [])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._run_bound(x)
        out = self.session.run(None, {self.input_name: x.to("cpu", self.dtype).contiguous().numpy()})[0]
        return torch.from_numpy(out).float()

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Input and output as CUDA tensors bound to the session (the models keep the input's shape)."""
        import numpy as np

        x = x.to(self.device, self.dtype).contiguous()
        y = x.new_empty((x.shape[0], self.out_planes or x.shape[1], *x.shape[2:]))  # a quality plane goes in, not out
        element = np.float16 if self.dtype == torch.float16 else np.float32
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index or 0, element, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.device.index or 0, element, tuple(y.shape), y.data_ptr())
        torch.cuda.current_stream().synchronize()  # x is ready before ORT's own stream reads it
        self.session.run_with_iobinding(binding)
        return y.float()

    def __call__(self, x):
        if self.tile and x.shape[-2:] != (self.tile, self.tile):
            return tiled_forward(self._run, x, self.tile, self.overlap)
        return self._run(x)

    def describe(self):
        return {**super().describe(), "provider": self.provider, "threads": self.threads,
                "precision": "fp16" if self.dtype == torch.float16 else "fp32"}
