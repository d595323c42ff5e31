"""bench/hlo_ops.py: the ops of a compiled while loop's body, read from the optimized HLO."""

import jax
import jax.numpy as jnp
import pytest

from bench import hlo_ops


def loop(n_dots):
  def f(w, x):
    def body(carry):
      i, x = carry
      for _ in range(n_dots):
        x = jnp.tanh(x @ w)
      return i + 1, x
    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
  w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
  return jax.jit(f).lower(w, w).compile().as_text()


def test_body_ops_count_the_body_not_the_program():
  one, three = hlo_ops.body_ops(loop(1)), hlo_ops.body_ops(loop(3))
  dots = lambda c: sum(n for label, n in c.items() if label.endswith("dot"))
  assert dots(one) == 1 and dots(three) == 3
  assert not set(one) & hlo_ops.FREE
  assert sum(hlo_ops.body_shapes(loop(3), "dot").values()) <= 3
  assert hlo_ops.table(three).splitlines()[-1].split() == [str(sum(three.values())), "total"]


def test_no_loop_is_an_error():
  text = jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile().as_text()
  with pytest.raises(ValueError, match="no while loop"):
    hlo_ops.body_ops(text)


def test_body_sources_name_the_python_lines():
  text = loop(2)
  ops = hlo_ops.body_ops(text)
  tanh = [label for label in ops if "tanh" in label]
  assert tanh, ops
  sources = hlo_ops.body_sources(text, tanh[0])
  assert sum(sources.values()) == ops[tanh[0]]
  assert any("test_bench_hlo_ops.py:" in where for where in sources), sources
