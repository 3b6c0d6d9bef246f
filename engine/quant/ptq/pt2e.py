"""Static W8A8 post-training quantization with torchao's PT2E flow on the X86 back end.

    torch.export (at the sampling batch)  ->  prepare_pt2e(X86InductorQuantizer)
    ->  calibrate: the experiment's sampler on seeded calibration prompts (drawn from the
        experiment's prompts, or the digits' class prompts) over every step of a
        `steps`-step schedule (the calibration set GPTQ uses, engine.quant.calibration_hessians)
    ->  convert_pt2e  ->  (execution = "real") torch.compile with Inductor freezing, which lowers
        the quantize / dequantize patterns around each convolution and Linear to oneDNN int8
        kernels; (execution = "simulated") the converted graph as is: the same int8 rounding done
        by reference quantize / dequantize ops in FP32.

X86InductorQuantizer's default config: weights int8 symmetric per output channel (one fp32
scale per channel), activations uint8 affine per tensor from a histogram observer. Every
Conv2d and Linear is covered, so the deprecated eager torch.ao.quantization API is not used.
Attention's matrix products (scaled_dot_product_attention), norms and the timestep embedding
stay in FP32: the quantizer does not annotate them.

The graph is exported at the batch the sampler runs (guidance doubles it); a smaller batch
(the calibration prompts, a last partial batch) is padded by repeating its rows cyclically, so
that the observers weigh every real row alike, and the output is cut back (rows are
independent: group norm and attention act within a sample).

Memory: `model_bytes` of a PT2E run counts the tensors the converted graph reads (int8 weights,
fp32 scales, int64 zero points, the FP32 tensors left); with `execution = "real"` Inductor's
freezing also keeps prepacked copies of the weights inside the compiled code, which only
`peak_mem_mb` sees.

Checkpoint (`ptq.safetensors`): the converted graph is not the packed format (its scales are
fp32, activations have zero points, the graph fixes where each quantize sits). What is stored is
every tensor the converted graph holds (int8 weights, their per-channel scales and zero points,
the FP32 parameters it kept), with the activation quantization parameters of every quantize node
in the metadata; the graph's code is the run artifact `ptq_graph.txt`. It is written, read back and compared tensor by tensor with
the graph that is then evaluated; re-exporting the same model and setting these values rebuilds
the same graph.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from engine.atomic_files import atomic_path, write_text

CHECKPOINT_FILE = "ptq.safetensors"
GRAPH_FILE = "ptq_graph.txt"  # the converted graph's code (a run artifact, not executed)
META_KEY = "qtui_ptq"


# The denoiser's tensor inputs, in the order the exported graph takes them (the names of
# UNet2DConditionModel.forward and SD3Transformer2DModel.forward).
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
FLOW_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def input_names(flow: bool) -> tuple[str, ...]:
    return FLOW_INPUTS if flow else UNET_INPUTS


class _Call(nn.Module):
    """The denoiser called with its tensor inputs only, returning a plain tensor (exportable)."""

    def __init__(self, denoiser: nn.Module, flow: bool):
        super().__init__()
        self.denoiser, self.names = denoiser, input_names(flow)

    def forward(self, *tensors):
        return self.denoiser(**dict(zip(self.names, tensors)), return_dict=False)[0]


@dataclass(frozen=True)
class Convention:
    """How sampling calls a denoiser: its config, forward signature, device and family (kept
    instead of the full-precision module, which is not held once the graph replaces it)."""

    config: object
    signature: inspect.Signature
    device: torch.device
    flow: bool

    @classmethod
    def of(cls, denoiser: nn.Module, flow: bool) -> "Convention":
        return cls(denoiser.config, inspect.signature(denoiser.forward), next(denoiser.parameters()).device, flow)


class GraphDenoiser(nn.Module):
    """A fixed-batch graph behind the denoiser's calling convention, so that every sampler calls
    it as it calls the denoiser: positionally (the digits adapters) or by keyword, with
    `return_dict=False` (diffusers pipelines); the result has `.sample` or is a 1-tuple. An
    argument the graph was not exported with (a ControlNet residual, an attention mask, ...) is
    an error, never silently dropped. The timestep is passed as one float32 value per row."""

    def __init__(self, graph: nn.Module, convention: "Convention", batch: int):
        super().__init__()
        self.graph, self.batch = graph, batch
        self.config, self.signature, self._device = convention.config, convention.signature, convention.device
        self.names = input_names(convention.flow)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._device

    def _pad(self, t, n: int):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n or n == self.batch:
            return t
        if n > self.batch:
            raise ValueError(f"batch {n} is larger than the exported batch {self.batch}")
        reps = -(-self.batch // n)  # cyclic: calibration statistics keep every row's weight
        return t.repeat(reps, *[1] * (t.dim() - 1))[: self.batch]

    def inputs(self, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], bool]:
        """The graph's tensors of one call, and whether the caller wants a `.sample` result."""
        bound = self.signature.bind(*args, **kwargs)
        values = dict(bound.arguments)
        return_dict = values.pop("return_dict", True)
        for name, value in values.items():
            if name not in self.names and value is not None and value != {}:
                raise ValueError(f"the PTQ graph was exported without {name!r}; it cannot take it")
        tensors = [values[name] for name in self.names]
        x = tensors[0]
        t = torch.as_tensor(values["timestep"], device=x.device).to(torch.float32)
        tensors[self.names.index("timestep")] = t.expand(x.shape[0]) if t.dim() == 0 else t
        return tensors, return_dict

    def forward(self, *args, **kwargs):
        tensors, return_dict = self.inputs(args, kwargs)
        n = tensors[0].shape[0]
        out = self.graph(*(self._pad(t, n) for t in tensors))[:n]
        return SimpleNamespace(sample=out) if return_dict else (out,)


def example_inputs(model, batch: int) -> tuple:
    """Inputs of one exported call, in `input_names` order."""
    x = torch.randn((batch, *model.sample_shape), device=model.device)
    cond = model.encode([""] * batch)  # the shapes are what matter: any prompt pads to the same length
    t = torch.full((batch,), 500.0, device=model.device)
    if model.is_flow:
        return (x, cond.states, cond.pooled, t)
    return (x, t, cond.states)


def export_batch(sampling: dict) -> int:
    return sampling["batch_size"] * (2 if sampling["guidance"] != 1.0 else 1)


def _attr(gm: nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def graph_tensors(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads (get_attr): int8 weights, scales, zero points, FP tensors."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                out.setdefault(node.target, value)
    return out


def drop_unused(gm: nn.Module) -> None:
    """Delete the parameters and buffers the converted graph no longer reads (the FP32 weights
    that convert_pt2e replaced by folded int8 constants), so memory holds only what runs."""
    used = set(graph_tensors(gm))
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = _attr(gm, owner_name) if owner_name else gm
            if leaf in owner._parameters:
                del owner._parameters[leaf]
            elif leaf in owner._buffers:
                del owner._buffers[leaf]


def graph_bytes(gm: nn.Module) -> int:
    seen, total = set(), 0
    for t in graph_tensors(gm).values():
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def activation_qparams(gm: nn.Module) -> list[list]:
    """(node, scale, zero point) of every per-tensor quantize of an activation."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target) and "dequantize" not in str(node.target):
            scale, zero = node.args[1], node.args[2]
            if isinstance(scale, (int, float)):
                out.append([node.name, float(scale), int(zero)])
    return out


def int8_layers(gm: nn.Module) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "dequantize_per_channel" in str(n.target))


def save_checkpoint(gm: nn.Module, path: Path) -> int:
    """Write the converted graph's tensors and activation parameters; read back; check equal."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in graph_tensors(gm).items()}
    meta = {"activations": activation_qparams(gm), "int8_layers": int8_layers(gm)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    loaded, _ = read_checkpoint(path)
    for key, value in tensors.items():
        if not torch.equal(loaded[key], value) or loaded[key].dtype != value.dtype:
            raise RuntimeError(f"{path}: {key} does not read back as the evaluated graph's tensor")
    return os.path.getsize(path)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a `save_checkpoint` file; DamagedFile for a damaged one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.errors import DamagedFile
    from engine.file_checks import check_safetensors

    header = check_safetensors(path)
    try:
        meta = json.loads(header.get("__metadata__", {})[META_KEY])
        if not isinstance(meta, dict) or not isinstance(meta.get("activations"), list):
            raise ValueError("no activation parameters in its metadata")
        return load_file(str(path)), meta
    except KeyError:
        raise DamagedFile(path, f"not a PTQ checkpoint (no {META_KEY} metadata)") from None
    except (ValueError, SafetensorError) as exc:
        raise DamagedFile(path, f"not a valid PTQ checkpoint: {exc}") from None


class PT2ERuntime:
    """What the execution stage runs: the converted graph, compiled for real int8 kernels or not."""

    def __init__(self, converted: nn.Module, convention: Convention, batch: int, example: tuple):
        self.converted, self.convention, self.batch, self.example = converted, convention, batch, example

    def executable(self, execution: str) -> tuple[nn.Module, dict]:
        metrics = {"model_bytes_graph": float(graph_bytes(self.converted))}
        graph = self.converted
        start = time.time()
        if execution == "real":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant weights: int8 prepacking and q/dq fusion
            graph = torch.compile(self.converted)
            with torch.no_grad():
                graph(*self.example)  # compiles
        metrics["compile_s"] = time.time() - start
        return GraphDenoiser(graph, self.convention, self.batch), metrics


def quantize_pt2e(model, cfg: dict, sampling: dict, folder: Path,
                  progress: Callable[..., None] | None = None) -> tuple[PT2ERuntime, dict, Path]:
    """Export, prepare, calibrate and convert `model.denoiser`; returns the runtime, metrics and
    the checkpoint path. `sampling` is the experiment's sampling config with its `prompts` (the
    calibration prompts are drawn from them; None for the digits' class prompts). While
    calibrating, the prepared graph is the model's denoiser (installed where its sampler calls
    it); afterwards `model.denoiser` is the full-precision module again."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from engine.quant.calibration_hessians import calibration_set, run_sampler

    denoiser, flow = model.denoiser, model.is_flow
    if denoiser.dtype != torch.float32:
        raise ValueError(f"method 'ptq' quantizes a float32 denoiser (X86 int8 kernels); this one is "
                         f"{str(denoiser.dtype).removeprefix('torch.')}: set the experiment's dtype = \"float32\"")
    convention = Convention.of(denoiser, flow)
    batch = export_batch(sampling)
    report = (lambda stage: (lambda done, total: progress(stage, done, total))) if progress else (lambda s: None)
    start = time.time()
    with torch.no_grad():
        example = example_inputs(model, batch)
        exported = torch.export.export(_Call(denoiser, flow).eval(), example)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    export_s = time.time() - start

    start = time.time()
    cal = calibration_set(model, cfg, sampling.get("prompts"))
    model.denoiser = GraphDenoiser(prepared, convention, batch)
    try:
        run_sampler(model, cal.prompts, cal.noise, cfg, sampling, report("calibrate"))
    finally:
        model.denoiser = denoiser
    calibration_s = time.time() - start

    start = time.time()
    converted = convert_pt2e(prepared)
    drop_unused(converted)
    path = Path(folder) / CHECKPOINT_FILE
    save_checkpoint(converted, path)
    write_text(Path(folder) / GRAPH_FILE, converted.code)
    metrics = {"export_s": export_s, "calibration_s": calibration_s, "quantize_s": time.time() - start,
               "ptq_int8_layers": float(int8_layers(converted))}
    return PT2ERuntime(converted, convention, batch, example), metrics, path
