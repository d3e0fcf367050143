"""A serialized TensorRT engine (10+ name-based API), torch CUDA tensors as I/O buffers.
Engines are built by export/to_trt.py (FP16 and FP32)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import Runner, RunnerUnavailable, register_runner


@register_runner("tensorrt")
class TensorRTRunner(Runner):
    artifact, order = "engine", 3

    def __init__(self, engine_path: Path | str, device: str = "cuda"):
        import tensorrt as trt

        if not Path(engine_path).is_file():
            raise RunnerUnavailable(f"no TensorRT engine at {engine_path} (build it with python export/to_trt.py)")
        self.device = torch.device("cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.dtype = torch.float16 if self.engine.get_tensor_dtype(self.input) == trt.DataType.HALF else torch.float32
        self.stream = torch.cuda.Stream()

    @classmethod
    def unavailable(cls, device):
        if importlib.util.find_spec("tensorrt") is None:
            return ("TensorRT is not installed (pip install -e \".[tensorrt]\" on a machine with an NVIDIA GPU; "
                    "on PyPI tensorrt-cu13-libs is a stub that downloads the real wheel from NVIDIA's own index)")
        if not torch.cuda.is_available():
            return "no NVIDIA GPU / CUDA device on this machine"
        return None

    @classmethod
    def open(cls, path, device="cuda", **options):
        return cls(path, device)

    @classmethod
    def variants(cls, device):
        return [(f"tensorrt {p}", {"precision": p}) for p in ("fp16", "fp32")]

    def __call__(self, x):
        x = x.to(self.device, self.dtype).contiguous()
        self.context.set_input_shape(self.input, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device=self.device, dtype=self.dtype)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, y.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        self.context.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream().wait_stream(self.stream)
        return y.float()

    def describe(self):
        return {**super().describe(), "precision": "fp16" if self.dtype == torch.float16 else "fp32"}
