"""Inference backends behind one interface: a runner maps a float NCHW torch tensor in [0, 1]
to the restored tensor. Registered only when their library imports; a runner that cannot run
here raises RunnerUnavailable with the reason (the benchmark table prints it, no number)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

from train.inference import autocast_for, restore_tensor
from train.models.common import tiled_forward

RUNNERS: dict[str, Callable[..., "Runner"]] = {}


class RunnerUnavailable(RuntimeError):
    """This backend cannot run on this machine; the message says why."""


def register_runner(name: str, needs: str | None = None):
    def wrap(cls):
        if needs is None or importlib.util.find_spec(needs) is not None:
            RUNNERS[name] = cls
        cls.name = name
        return cls
    return wrap


class Runner:
    name = "runner"
    device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def restore(self, x: torch.Tensor, ensemble: bool = False) -> torch.Tensor:
        """Whole images of any size: tiled above 512 px (and at the tile size of fixed-size models);
        `ensemble` averages over the 8 rotations and flips."""
        return restore_tensor(self, x, ensemble=ensemble)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}


@register_runner("torch")
class TorchRunner(Runner):
    """PyTorch eager: the reference. precision fp32 (default), bf16 or fp16 autocast."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu", precision: str = "fp32", channels_last: bool = False, **_):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.precision, self.channels_last = precision, channels_last

    @torch.inference_mode()
    def __call__(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.precision, self.device):
            return self.model(x.to(self.device)).float()

    def describe(self):
        return {**super().describe(), "precision": self.precision, "channels_last": self.channels_last}


@register_runner("torch-compile")
class CompiledRunner(TorchRunner):
    """torch.compile (inductor); fails over to RunnerUnavailable where it cannot compile."""

    def __init__(self, model, device="cpu", precision="fp32", **kw):
        super().__init__(model, device, precision)
        self.model = torch.compile(self.model, dynamic=False)

    def __call__(self, x):
        try:
            return super().__call__(x)
        except Exception as exc:  # noqa: BLE001 - inductor errors have many types
            raise RunnerUnavailable(f"torch.compile failed: {str(exc).strip().splitlines()[0][:160]}") from None


@register_runner("onnxruntime", needs="onnxruntime")
class OrtRunner(Runner):
    """ONNX Runtime: TensorRT / CUDA execution providers on a GPU, the CPU provider otherwise."""

    def __init__(self, onnx_path: Path | str, device: str = "cpu", threads: int = 0, tile: int = 0, overlap: int = 16, **_):
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise RunnerUnavailable(f"no ONNX model at {onnx_path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        available = ort.get_available_providers()
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.startswith("cuda") else []
        providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.device = torch.device("cuda" if self.provider != "CPUExecutionProvider" else "cpu")
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = torch.float16 if "float16" in self.session.get_inputs()[0].type else torch.float32
        self.tile, self.overlap, self.threads = tile, overlap, opts.intra_op_num_threads

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.to("cpu", self.dtype).contiguous().numpy()})[0]
        return torch.from_numpy(out).float()

    def __call__(self, x):
        if self.tile and x.shape[-2:] != (self.tile, self.tile):
            return tiled_forward(self._run, x, self.tile, self.overlap)
        return self._run(x)

    def describe(self):
        return {**super().describe(), "provider": self.provider, "threads": self.threads,
                "precision": "fp16" if self.dtype == torch.float16 else "fp32"}


@register_runner("tensorrt", needs="tensorrt")
class TensorRTRunner(Runner):
    """A serialized TensorRT engine (10+ name-based API), torch CUDA tensors as I/O buffers."""

    def __init__(self, engine_path: Path | str, device: str = "cuda", **_):
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise RunnerUnavailable("TensorRT needs an NVIDIA GPU; torch sees no CUDA device")
        if not Path(engine_path).is_file():
            raise RunnerUnavailable(f"no TensorRT engine at {engine_path}")
        self.device = torch.device("cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.dtype = torch.float16 if self.engine.get_tensor_dtype(self.input) == trt.DataType.HALF else torch.float32
        self.stream = torch.cuda.Stream()

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


def tensorrt_status() -> str | None:
    """None if TensorRT can run here, else the plain reason it cannot."""
    if "tensorrt" not in RUNNERS:
        return "TensorRT is not installed (pip install -e \".[tensorrt]\" on a machine with an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU / CUDA device on this machine"
    return None
