"""bench.ptx: the kernels a case lowers to (no triton needed), the facts read off ptxas and PTX,
and its one-line refusals. The compile itself needs the triton package, which CI does not
install (~640 MB)."""

import sys
from unittest import mock

from bench import kernel_cases, ptx
from tinyllama_jax.kernels import _pallas


def test_a_case_lowers_to_its_kernels_with_their_launch_settings():
  # Lowered once already in this process (as the lowering test does): found all the same.
  fn, args = kernel_cases.traced("decode_qkv_1")
  with mock.patch.object(_pallas, "interpret_default", lambda: False):
    fn.trace(*args).lower(lowering_platforms=("cuda",))
  (kernel,) = ptx.kernels_of("decode_qkv_1")
  assert kernel["name"] == "norm_gemv"
  assert kernel["grid"] == [1280, 1, 1]  # 2560 rows, 2 a program
  assert (kernel["num_warps"], kernel["num_stages"]) == (4, 3)
  assert "tt.func public @norm_gemv" in kernel["ttir"]
  # Forward and backward of a training kernel: two kernels, in lowering order.
  assert [k["name"] for k in ptx.kernels_of("rms_norm")] == ["rms_norm_fwd", "rms_norm_bwd"]


def test_facts_are_read_off_ptxas_and_the_ptx():
  log = ("ptxas info    : Compiling entry function 'gemv_add' for 'sm_90a'\n"
         "ptxas info    : Function properties for gemv_add\n"
         "    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
         "ptxas info    : Used 62 registers, used 1 barriers, 2048 bytes smem\n")
  assert ptx.ptxas_facts(log) == {"registers": 62, "spill_bytes": 8}
  assert ptx.ptxas_facts("") == {"registers": None, "spill_bytes": None}
  code = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
          "\tld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];\n"
          "\t@%p1 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];\n"
          "\tcp.async.cg.shared.global [ %r27 + 0 ], [ %rd19 + 0 ], 0x10, %r28;\n"
          "\tcp.async.ca.shared.global [ %r9 + 0 ], [ %rd9 + 0 ], 8, %r28;\n")
  assert ptx.global_reads(code) == {"ld.global.v4.b32": 2, "ld.global.b16": 1,
                                    "cp.async 16 B": 1, "cp.async 8 B": 1}


def test_without_triton_or_with_no_case_it_refuses_in_one_line(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
  assert ptx.main([]) == 2
  assert capsys.readouterr().err.strip() == ("bench.ptx needs the triton package: "
                                             "pip install triton==3.6.0")
  monkeypatch.setitem(sys.modules, "triton", sys)  # any module: past the check
  assert ptx.main(["--cases=nothing_"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--cases='nothing_' matches no case" in err and "\n" not in err
