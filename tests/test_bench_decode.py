"""bench.decode's agreement between row sets (the timed rows need a GPU: bench.gpu's smoke runs
them on the tiny config)."""

from bench import decode as bench_decode


def test_agreement_is_the_worst_rows_shared_prefix():
  reference = [[5, 6, 7, 8], [1, 2, 3, 4]]
  assert bench_decode.agreement([[5, 6, 7, 8], [1, 2, 3, 4]], reference) == 1.0
  assert bench_decode.agreement([[5, 6, 7, 8], [1, 2, 9, 4]], reference) == 0.5
  assert bench_decode.agreement([[0, 6, 7, 8], [1, 2, 3, 4]], reference) == 0.0
  # A row cut short (EOS) reproduces only the tokens it has.
  assert bench_decode.agreement([[5, 6]], [[5, 6, 7, 8]]) == 0.5
