"""The Pallas Triton kernels compiled for an H100 on any machine, GPU or not.

    python3 -m bench.ptx [--cases=decode_] [--out=ptx.json]   # from the checkout's root

Each case of bench.kernel_cases is lowered as on a GPU (jax's Pallas -> Triton IR), each of its
kernels' Triton IR compiled to PTX for sm_90a by the triton package and assembled by its ptxas;
then a row a kernel: grid, warps, pipeline stages, shared memory, registers, spilled bytes and its
global reads (`ld.global` widths, `cp.async` copies into shared memory). What a kernel will cost
in registers and shared memory, whether it spills, whether its weight reads are 16-byte vectors:
known before any device time, which is scarce.

The numbers are those of the triton package's compiler, close to but not the one jaxlib's XLA
bundles (the GPU compiles the same IR itself): a check, not the GPU's final word.
Needs triton (not in requirements, ~640 MB): `pip install triton==3.6.0`.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import jax
from jax._src.interpreters import mlir
from jax._src.pallas.triton import pallas_call_registration

import bench
from bench import kernel_cases
from tinyllama_jax.kernels import _pallas

_TRITON_CALL = "__gpu$xla.gpu.triton"
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores")
_LOADS = re.compile(r"(ld\.global(?:\.[a-z0-9]+)*)")
# cp.async.cg.shared.global [dst], [src], 0x10, src-size;  (the third operand: bytes copied)
_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],"
                    r"\s*(0x[0-9a-f]+|\d+)")


def _int_attr(config, key):
  return int(str(config[key]).split(":")[0].strip())


def kernels_of(name):
  """[{name, grid, num_warps, num_stages, ttir}] of a case's Triton kernels, lowered on this
  machine for a GPU: the Pallas lowering's module and the custom call it becomes, paired by
  order (one lowering, then its call)."""
  modules, calls = [], []
  lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module
  custom_call = mlir.custom_call

  def lower_and_keep(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  def call_and_keep(*args, **kwargs):
    if kwargs.get("call_target_name", args[0] if args else None) == _TRITON_CALL:
      calls.append(kwargs["backend_config"])
    return custom_call(*args, **kwargs)

  fn, args = kernel_cases.traced(name)
  jax.clear_caches()  # a case lowered before in this process would not run the lowering again
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(_pallas, "interpret_default", lambda: False))
    stack.enter_context(mock.patch.object(pallas_call_registration.lowering,
                                          "lower_jaxpr_to_triton_module", lower_and_keep))
    stack.enter_context(mock.patch.object(mlir, "custom_call", call_and_keep))
    fn.trace(*args).lower(lowering_platforms=("cuda",))
  return [{"name": str(c["name"]).strip('"'),
           "grid": [_int_attr(c, f"grid_{a}") for a in "xyz"],
           "num_warps": _int_attr(c, "num_warps"), "num_stages": _int_attr(c, "num_stages"),
           "ttir": ttir} for ttir, c in zip(modules, calls)]


def ptxas_facts(ptxas_log):
  """{registers, spill_bytes} from `ptxas -v`'s report of one kernel."""
  regs, spills = _REGS.search(ptxas_log), _SPILLS.search(ptxas_log)
  return {"registers": int(regs.group(1)) if regs else None,
          "spill_bytes": int(spills.group(1)) if spills else None}


def global_reads(ptx):
  """{`ld.global` form: count, `cp.async` bytes: count} of a kernel's PTX."""
  out = {}
  for form in _LOADS.findall(ptx):
    out[form] = out.get(form, 0) + 1
  for size in _ASYNC.findall(ptx):
    key = f"cp.async {int(size, 0)} B"
    out[key] = out.get(key, 0) + 1
  return out


def compile_kernel(kernel, arch, scratch):
  """The triton package's compile of one kernel's IR for `arch` (e.g. 90), its PTX through
  ptxas -v: the row's compiled facts."""
  import triton  # optional (see the docstring); main checks it first
  from triton.backends.compiler import GPUTarget
  path = os.path.join(scratch, kernel["name"] + ".ttir")
  with open(path, "w") as f:
    f.write(kernel["ttir"])
  compiled = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": kernel["num_warps"],
                                     "num_stages": kernel["num_stages"]})
  ptx = compiled.asm["ptx"]
  ptx_path = path[:-len(".ttir")] + ".ptx"
  with open(ptx_path, "w") as f:
    f.write(ptx)
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  log = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", ptx_path, "-o", os.devnull],
                       capture_output=True, text=True, check=True).stderr
  return {"shared_bytes": compiled.metadata.shared, **ptxas_facts(log),
          "global_reads": global_reads(ptx)}


def print_row(r):
  grid = "x".join(str(g) for g in r["grid"] if g > 1) or "1"
  reads = ", ".join(f"{k} x{v}" for k, v in sorted(r["global_reads"].items()))
  print(f"{r['case']:<20} {r['name']:<26} {grid:>7} {r['num_warps']:>5} {r['num_stages']:>6} "
        f"{r['shared_bytes']:>8} {r['registers']!s:>4} {r['spill_bytes']!s:>6}  {reads}",
        flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default="", help="only the cases whose names start with this")
  ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100, H200)")
  ap.add_argument("--out", default="", help="also write the rows here as JSON")
  args = ap.parse_args(argv)
  try:
    import triton  # noqa: F401
  except ImportError:
    print("bench.ptx needs the triton package: pip install triton==3.6.0", file=sys.stderr)
    return 2
  names = [n for n in sorted(kernel_cases.CASES) if n.startswith(args.cases)]
  if not names:
    print(f"--cases={args.cases!r} matches no case of bench.kernel_cases: one of "
          f"{', '.join(sorted(kernel_cases.CASES))}", file=sys.stderr)
    return 2
  print(f"{'case':<20} {'kernel':<26} {'grid':>7} {'warps':>5} {'stages':>6} {'smem B':>8} "
        f"{'regs':>4} {'spill':>6}  global reads")
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for name in names:
      for kernel in kernels_of(name):
        facts = compile_kernel(kernel, args.arch, scratch)
        rows.append({"case": name, **{k: v for k, v in kernel.items() if k != "ttir"}, **facts})
        print_row(rows[-1])
  if args.out:
    import triton
    meta = dict(date=bench.now_utc(), commit=bench.commit(), versions=bench.versions(),
                triton=triton.__version__, arch=f"sm_{args.arch}a")
    with open(args.out, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
