"""The fast network path: switches that make a network's forward pass cheaper, for sampling.

With the paper's 43.5M-parameter U-Net the network is 99% of the sampling time, so the
switches act on it: channels-last memory format (oneDNN and cuDNN convolutions run without
layout reorders), bfloat16 autocast (where the hardware has bfloat16 arithmetic: AVX-512 BF16 or
AMX on a CPU, compute capability 8.0+ on a GPU), inference mode (no autograd bookkeeping) and
torch.compile (Inductor fuses the normalisation and activation kernels between convolutions).
``FastNetwork`` applies them to a network and is called like it; ``bf16_unsupported`` says
where bfloat16 would only be emulated.

Defaults are the switches that leave the output as it is (to float rounding): channels-last and
inference mode. bfloat16 changes the output (measured max |difference| ~5e-3 on outputs of
magnitude ~1 for the paper and tiny U-Nets); it is off until its effect on restored images has
been measured. torch.compile is off because its first call compiles for one to several minutes
on a CPU (later processes reuse Inductor's on-disk cache, TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_<user>, and start in seconds).
"""

from typing import Optional

import torch
import torch.nn as nn


def bf16_unsupported(device) -> Optional[str]:
    """None when bfloat16 autocast runs in native bfloat16 arithmetic on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cpu":
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return "this CPU has neither AVX-512 BF16 nor AMX (or torch was built without oneDNN): bfloat16 would be emulated, slower than float32"
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return "this GPU has no bfloat16 arithmetic (compute capability below 8.0)"
    return f"bfloat16 autocast is only supported here on CPU and CUDA devices, got {device.type}"


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


class FastNetwork(nn.Module):
    """``network`` with the fast-path switches, called like it: forward(x, t, ...) -> output.

    channels_last (default True): the network's weights are converted to channels-last memory
    format IN PLACE (``network.to(memory_format=torch.channels_last)``) and every 4-d input is
    passed in that format; same output to float rounding.
    bf16 (default False): run under bfloat16 autocast on the input's device; the output is
    returned in the input's dtype. Raises ValueError where bfloat16 would be emulated.
    inference_mode (default True): run under torch.inference_mode(): no autograd graph (the
    outputs cannot be differentiated or modified in place; sampling does neither).
    compile (default False): torch.compile the forward pass; the first call compiles (minutes on
    a CPU for the paper U-Net), later calls with the same shapes reuse the compiled code.

    The output is contiguous in the standard layout and in the dtype of the first input, as the
    samplers' fused steps expect.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        channels_last: bool = True,
        bf16: bool = False,
        inference_mode: bool = True,
        compile: bool = False,
    ):
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network: expected a torch.nn.Module, got {type(network).__name__}")
        self.channels_last = _check_flag("channels_last", channels_last)
        self.bf16 = _check_flag("bf16", bf16)
        self.inference_mode = _check_flag("inference_mode", inference_mode)
        self.compile = _check_flag("compile", compile)
        if bf16:
            device = next((p.device for p in network.parameters()), torch.device("cpu"))
            reason = bf16_unsupported(device)
            if reason is not None:
                raise ValueError(f"bf16: expected a device with bfloat16 arithmetic, got {device}: {reason}")
        if channels_last:
            network.to(memory_format=torch.channels_last)
        self.network = network
        # a plain attribute, not a submodule: the compiled wrapper shares the network's parameters
        self.__dict__["_forward"] = torch.compile(self._convert_and_run) if compile else self._convert_and_run

    def extra_repr(self) -> str:
        return (
            f"channels_last={self.channels_last}, bf16={self.bf16}, inference_mode={self.inference_mode}, compile={self.compile}"
        )

    def _convert_and_run(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
            args = tuple(
                a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
                for a in args
            )
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.network(x, *args, **kwargs)
        return output.to(x.dtype).contiguous()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if self.inference_mode:
            with torch.inference_mode():
                return self._forward(x, *args, **kwargs)
        return self._forward(x, *args, **kwargs)
