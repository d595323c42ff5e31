"""Dense bf16 peak FLOP/s per device, by device name (datasheet numbers): MFU's denominator.

No jax here: the bench's parent process names the PyTorch peer's GPU (torch's device name, which
spells NVIDIA's kinds as jax does) and must not load jax.
"""

PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12,
    "NVIDIA L40S": 362e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device_kind):
  """The peak of a device kind; else of the longest table name inside it (a variant spelling,
  such as 'NVIDIA H200 NVL'); None when unknown (CPU): no MFU."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  inside = [name for name in PEAK_FLOPS if name in (device_kind or "")]
  return PEAK_FLOPS[max(inside, key=len)] if inside else None
