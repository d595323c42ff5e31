"""bench/fp8_check.py: counting the GEMM custom calls of an optimized HLO (the FP8 one apart)."""

from bench import fp8_check

_HLO = '''
%cublas-gemm.1 = (bf16[16384,5632]{1,0}, s8[33554432]{0}) custom-call(bf16[16384,2048]{1,0} %p0, bf16[2048,5632]{1,0} %p1), custom_call_target="__cublas$lt$matmul", backend_config={}
%cublas-gemm.2 = (bf16[16384,5632]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[16384,2048]{1,0} %q0, f8e4m3fn[5632,2048]{1,0} %q1, f32[] %s0, f32[] %s1), custom_call_target="__cublas$lt$matmul$f8", backend_config={}
%cublas-gemm.3 = (bf16[16384,2048]{1,0}, s8[33554432]{0}) custom-call(f8e5m2[16384,5632]{1,0} %g, f8e4m3fn[2048,5632]{1,0} %q1t, f32[] %s2, f32[] %s1), custom_call_target="__cublas$lt$matmul$f8", backend_config={}
%gemm_fusion = bf16[64,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
'''


def test_gemm_calls_counts_each_target_and_the_fp8_types():
  counts = fp8_check.gemm_calls(_HLO)
  assert counts["__cublas$lt$matmul"] == 1
  assert counts["__cublas$lt$matmul$f8"] == 2
  assert counts["triton_gemm_fusions"] == 1
  assert counts["mentions_f8e4m3"] and counts["mentions_f8e5m2"]
  assert fp8_check.gemm_calls("") == {"triton_gemm_fusions": 0, "mentions_f8e4m3": False,
                                      "mentions_f8e5m2": False}
