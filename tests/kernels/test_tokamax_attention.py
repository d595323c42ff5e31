"""tokamax's Mosaic GPU attention behind our signature: the packed-document mask it is given
(per-query first key + causal) equals the reference's segment mask (CPU, no tokamax needed);
on the device, forward and gradients against the fp32 reference, with and without documents."""

import importlib.util

import numpy as np
import pytest

import jax.numpy as jnp

from kernels_util import check_attention, packed_segments
from tinyllama_jax.kernels import tokamax_attention


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_padding", [False, True])
def test_document_starts_give_the_reference_segment_mask(seed, with_padding):
  rng = np.random.default_rng(seed)
  seg_BT = packed_segments(rng, 3, 96, with_padding=with_padding)
  start_BT = tokamax_attention.document_starts(seg_BT)
  t = jnp.arange(96)
  mask_BTS = (t[None, None, :] >= start_BT[:, :, None]) & (t[None, None, :] <= t[None, :, None])
  ref_BTS = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (t[None, None, :] <= t[None, :, None])
  np.testing.assert_array_equal(mask_BTS, ref_BTS)


def test_without_tokamax_the_error_names_the_install_and_the_alternatives():
  if importlib.util.find_spec("tokamax") is not None:
    pytest.skip("tokamax is installed here: the error path cannot run")
  with pytest.raises(ValueError, match=r"pip install tokamax==.*attention=cudnn"):
    tokamax_attention._impl()


@pytest.mark.gpu
@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("H,K,D", [(32, 4, 64), (16, 2, 128), (8, 8, 64)])
def test_matches_the_reference_on_the_gpu(on_gpu, H, K, D, segmented):
  check_attention(tokamax_attention.attention_tokamax, 2, 1024, H, K, D, jnp.bfloat16,
                  segmented=segmented, causal=True, seed=H + D)
