"""Runners: ``with Runner(...) as r: r.infer()`` — activate / infer / deactivate, imports done lazily.

A runner whose backend is not installed or has no device raises :class:`Unavailable` from
``activate`` with a one-line reason; the benchmark reports it and carries on with the others.

Timed regions contain no host<->device copies: inputs are bound once (ORT IO binding, TensorRT
device buffers) and outputs stay on the device. ``infer`` returns the elapsed nanoseconds of one
inference: ``perf_counter_ns`` on CPU, CUDA events on GPU.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Optional


class Unavailable(Exception):
    """A runtime that cannot run here (not installed, no GPU, model not supported)."""


ORT_LEVELS = ("disable", "basic", "extended", "all")


class Runner:
    """Polygraphy's lifecycle: ``activate`` (timed as the load), ``infer`` any number of times,
    ``deactivate``; or ``with Runner(...) as r``. Subclasses implement ``activate_impl``,
    ``infer_impl`` and ``deactivate_impl``; the public methods guard the state (``is_active``), so a
    runner is never used inactive, activated twice, or left active by an error."""

    name = "runner"
    device = "cpu"

    def __init__(self, model_path: str, feeds: dict):
        self.model_path = model_path
        self.feeds = feeds
        self.load_seconds: Optional[float] = None
        self.is_active = False

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()
        return False

    def activate(self) -> None:
        if self.is_active:
            raise RuntimeError(f"{self.name}: already active")
        t = time.perf_counter()
        try:
            self.activate_impl()
        except BaseException:
            self.deactivate_impl()  # release whatever a half-done activation holds
            raise
        self.load_seconds = time.perf_counter() - t
        self.is_active = True

    def infer(self) -> int:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: infer() on a runner that is not active")
        return self.infer_impl()

    def deactivate(self) -> None:
        if self.is_active:
            self.is_active = False
            self.deactivate_impl()

    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self) -> int:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass


class OrtRunner(Runner):
    """ONNX Runtime with the CPU, CUDA or TensorRT execution provider, through IO binding."""

    PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}

    def __init__(self, model_path, feeds, runtime="ort-cpu", opt_level="all", threads=None, fp16=False, cache_dir=None):
        super().__init__(model_path, feeds)
        self.runtime, self.opt_level, self.threads, self.fp16, self.cache_dir = runtime, opt_level, threads, fp16, cache_dir
        self.name = f"{runtime}[{opt_level}]"
        self.device = "cpu" if runtime == "ort-cpu" else "cuda"

    def activate_impl(self):
        try:
            from ..imports import import_blocked
            ort = import_blocked("onnxruntime")
        except ImportError as e:
            raise Unavailable(f"onnxruntime is not installed ({e})") from None
        provider = self.PROVIDERS[self.runtime]
        if provider not in ort.get_available_providers():
            raise Unavailable(f"{provider} is not available in this onnxruntime build (pip install onnxruntime-gpu)")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.opt_level]
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        # Interleaved sessions share the cores: a session whose workers spin-wait after a run steals
        # CPU from the next model's run, which makes A/B latencies bimodal. No spinning, no theft.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options = {}
        if provider == "TensorrtExecutionProvider":
            options = {"trt_fp16_enable": bool(self.fp16), "trt_engine_cache_enable": bool(self.cache_dir),
                       "trt_engine_cache_path": self.cache_dir or ""}
        providers = [(provider, options)]
        from ..verify import ort_source

        source, folder = ort_source(self.model_path)
        if folder:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:
            self.sess = ort.InferenceSession(source, so, providers=providers)
        except Exception as e:
            raise Unavailable(f"{provider}: {str(e).splitlines()[0][:200]}") from None
        if provider not in self.sess.get_providers():
            raise Unavailable(f"{provider} could not be initialised (no GPU or driver?)")
        self.binding = self.sess.io_binding()
        dev = "cpu" if self.device == "cpu" else "cuda"
        self._keep = []
        for name, arr in self.feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr, dev, 0)
            self._keep.append(value)
            self.binding.bind_ortvalue_input(name, value)
        for out in self.sess.get_outputs():
            self.binding.bind_output(out.name, dev)

    def infer_impl(self) -> int:
        t = time.perf_counter_ns()
        self.sess.run_with_iobinding(self.binding)
        if self.device == "cuda":
            self.binding.synchronize_outputs()
        return time.perf_counter_ns() - t

    def deactivate_impl(self):
        self.binding = None
        self.sess = None
        self._keep = []


class TrtRunner(Runner):
    """A native TensorRT engine built from the ONNX file (fp32, or fp16 with --fp16), cached on disk
    by the hash of the model bytes and the build flags; timed with CUDA events on a torch stream."""

    def __init__(self, model_path, feeds, fp16=False, cache_dir=None, **_):
        super().__init__(model_path, feeds)
        self.fp16, self.cache_dir = fp16, cache_dir
        self.name = "trt[fp16]" if fp16 else "trt[fp32]"
        self.device = "cuda"

    def activate_impl(self):
        try:
            import tensorrt as trt
        except ImportError:
            raise Unavailable("tensorrt is not installed (pip install 'foldkit-onnx[gpu]')") from None
        try:
            import torch
        except ImportError:
            raise Unavailable("the TensorRT runner uses torch for CUDA buffers; pip install 'foldkit-onnx[torch]'") from None
        if not torch.cuda.is_available():
            raise Unavailable("no CUDA device")
        logger = trt.Logger(trt.Logger.ERROR)
        with open(self.model_path, "rb") as f:
            data = f.read()
        key = hashlib.sha256(data + f"fp16={self.fp16};trt={trt.__version__}".encode()).hexdigest()[:24]
        cache = os.path.join(self.cache_dir, f"{key}.engine") if self.cache_dir else None
        runtime = trt.Runtime(logger)
        engine = None
        if cache and os.path.exists(cache):
            with open(cache, "rb") as f:
                engine = runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(data):
                raise Unavailable(f"TensorRT cannot parse the model: {parser.get_error(0)}")
            config = builder.create_builder_config()
            if self.fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            profile = builder.create_optimization_profile()
            for name, arr in self.feeds.items():
                profile.set_shape(name, arr.shape, arr.shape, arr.shape)
            config.add_optimization_profile(profile)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise Unavailable("TensorRT failed to build an engine")
            if cache:
                os.makedirs(self.cache_dir, exist_ok=True)
                tmp = cache + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(plan)
                os.replace(tmp, cache)
            engine = runtime.deserialize_cuda_engine(plan)
        self.torch, self.engine = torch, engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.from_numpy(self.feeds[name]).cuda()
                self.context.set_input_shape(name, tuple(t.shape))
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                         trt.int64: torch.int64, trt.bool: torch.bool}[engine.get_tensor_dtype(name)]
                t = torch.empty(shape, dtype=dtype, device="cuda")
            self.buffers[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def infer_impl(self) -> int:
        self.start.record(self.stream)
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.end.record(self.stream)
        self.end.synchronize()
        return int(self.start.elapsed_time(self.end) * 1e6)

    def deactivate_impl(self):
        self.context = self.engine = None
        self.buffers = {}


class TorchRunner(Runner):
    """PyTorch eager for a --model factory, on CPU or CUDA (CUDA events on GPU)."""

    def __init__(self, model_path, feeds, module=None, device="cpu", label="pytorch", threads=None, **_):
        super().__init__(model_path, feeds)
        self.module, self.device, self.threads = module, device, threads
        self.name = f"torch-{device}"
        self.label = label

    def activate_impl(self):
        try:
            import torch
        except ImportError:
            raise Unavailable("torch is not installed (pip install 'foldkit-onnx[torch]')") from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("no CUDA device")
        if self.module is None:
            raise Unavailable("the torch runtime needs --model FACTORY")
        self.torch = torch
        if self.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        # the caller's module is moved and put in eval mode only while active: deactivate restores both
        first = next(iter(self.module.parameters()), None)
        self._restore = (first.device if first is not None else None, self.module.training)
        self.module = self.module.to(self.device).eval()
        self.args = [torch.from_numpy(a).to(self.device) for a in self.feeds.values()]
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def infer_impl(self) -> int:
        torch = self.torch
        with torch.inference_mode():
            if self.device == "cuda":
                self.start.record()
                self.module(*self.args)
                self.end.record()
                self.end.synchronize()
                return int(self.start.elapsed_time(self.end) * 1e6)
            t = time.perf_counter_ns()
            self.module(*self.args)
            return time.perf_counter_ns() - t

    def deactivate_impl(self):
        restore = getattr(self, "_restore", None)
        if restore is not None and self.module is not None:
            device, training = restore
            if device is not None:
                self.module.to(device)
            self.module.train(training)
            self._restore = None
        if getattr(self, "_threads_before", None):
            self.torch.set_num_threads(self._threads_before)
            self._threads_before = None
        self.args = []


class OpenVinoRunner(Runner):
    """OpenVINO on CPU (the ``bench`` extra): it reads the ONNX file directly and compiles it with
    its own graph transformations (which fuse BatchNormalization into the Conv before it, as ORT's
    optimizer does). Inference precision is pinned to f32: on CPUs with bf16/AMX OpenVINO would
    otherwise lower precision by default, and original and folded would not run the same maths.
    Inputs are set once on the infer request; ``infer`` times one synchronous inference."""

    _core = None  # one Core per process, its CPU plugin loaded before any load is timed

    def __init__(self, model_path, feeds, threads=None, **_):
        super().__init__(model_path, feeds)
        self.threads = threads
        self.name = "openvino"
        try:  # untimed: otherwise the first model's load time would include the plugin's start-up
            self.core()
        except Exception:  # not installed or broken: activate() says so
            pass

    @classmethod
    def core(cls):
        if cls._core is None:
            import openvino as ov

            core = ov.Core()
            core.get_property("CPU", "FULL_DEVICE_NAME")  # loads the CPU plugin
            cls._core = core
        return cls._core

    def activate_impl(self):
        try:
            import openvino as ov
        except ImportError:
            raise Unavailable("openvino is not installed (pip install 'foldkit-onnx[bench]')") from None
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            core = self.core()
            self.compiled = core.compile_model(core.read_model(os.fsdecode(self.model_path)), "CPU", config)
            self.request = self.compiled.create_infer_request()
            for name, arr in self.feeds.items():
                self.request.set_tensor(name, ov.Tensor(arr))
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line text for unsupported ops
            raise Unavailable(f"openvino: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None

    def infer_impl(self) -> int:
        t = time.perf_counter_ns()
        self.request.infer()
        return time.perf_counter_ns() - t

    def deactivate_impl(self):
        self.request = None
        self.compiled = None


RUNTIMES = ("ort-cpu", "ort-cuda", "ort-trt", "trt", "openvino", "torch", "torch-cuda")
