"""What this machine can offer: devices and their memory, RAM, torch, available backends.

torch is imported here (it is the node's compute library anyway); vLLM is only looked up, never
imported, since importing it initializes CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import platform

import psutil

from protocol.membership import Capabilities, Device, Role
from protocol.versions import SOFTWARE_VERSION


def probe_machine(roles: list[Role]) -> Capabilities:
    import torch

    devices = [Device("cpu", platform.processor() or platform.machine() or "cpu", 0)]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(Device("cuda", props.name[:128], int(props.total_memory)))
    backends = ["torch"]
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        backends.append("vllm")
    return Capabilities(
        roles=roles,
        devices=devices,
        ram_bytes=int(psutil.virtual_memory().total),
        cpu_count=os.cpu_count() or 1,
        torch_version=str(torch.__version__),  # TorchVersion is a str subclass msgspec refuses
        backends=backends,
        software_version=SOFTWARE_VERSION,
    )
