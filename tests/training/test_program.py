"""The one program builder: its abstract state is what init makes, and train, plan and bench lower
the same step from it (same arguments, same donation)."""

import os

import jax

from tinyllama_jax import config as config_lib, sharding, train_state
from tinyllama_jax.training import program
from tinyllama_jax.training import plan as plan_lib
from tinyllama_jax.training import loop as train_lib
from bench import step as bench_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
  """configs/tiny.py (one device), smaller: one micro-batch of two sequences a step."""
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m, t = cfg.model, cfg.train
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, 64
  cfg.data.tokenizer_vocab_size = 512
  t.seq_len, t.micro_batch_per_device, t.global_batch = 64, 2, 2
  return cfg


def signature(prog):
  """{argument path: (shape, dtype, donated)} of the lowered train step."""
  with jax.set_mesh(prog.mesh):
    lowered = prog.lower_step()
  return {jax.tree_util.keystr(path): (a.shape, str(a.dtype), a.donated)
          for path, a in jax.tree_util.tree_leaves_with_path(lowered.args_info)}


def test_abstract_state_is_what_init_makes():
  cfg = tiny_config()
  mesh = sharding.make_mesh(cfg.mesh)
  prog = program.build_program(cfg, mesh)
  state = prog.jit_init()(jax.random.key(cfg.seed))
  assert jax.tree.structure(state) == jax.tree.structure(prog.abstract_state)
  for real, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(prog.abstract_state)):
    assert (real.shape, real.dtype) == (abstract.shape, abstract.dtype)
    assert real.sharding.is_equivalent_to(abstract.sharding, real.ndim)
  # run.param_checksums's tree (no mesh): the same leaves without shardings.
  plain = train_state.state_tree(cfg)
  assert jax.tree.structure(plain) == jax.tree.structure(prog.abstract_state)
  assert all((a.shape, a.dtype) == (b.shape, b.dtype) for a, b in
             zip(jax.tree.leaves(plain), jax.tree.leaves(prog.abstract_state)))
  assert (prog.micro_batch, prog.accum) == (2, 1)


def test_train_plan_and_bench_lower_the_same_step(tmp_path):
  cfg = tiny_config()
  run = train_lib.Run(cfg, str(tmp_path))
  try:
    train_sig = signature(run.program)
  finally:
    run.release()
  _, bench_prog = bench_step.variant_program(cfg, accum=1)
  _, plan_prog = plan_lib.planning_program(cfg, run.mesh, cfg.model.remat, stand_ins=False)
  assert signature(bench_prog) == train_sig
  assert signature(plan_prog) == train_sig
  T = cfg.train.seq_len
  batch = {k: v for k, v in train_sig.items() if k.startswith("[0][1]")}
  state = {k: v for k, v in train_sig.items() if k.startswith("[0][0]")}
  assert len(batch) + len(state) == len(train_sig)  # no keyword arguments
  assert batch["[0][1]['inputs']"] == ((1, 2, T), "int32", False)
  assert batch["[0][1]['loss_mask']"] == ((1, 2, T), "float32", False)
  assert all(donated for _, _, donated in state.values())  # the state, and only it
  assert len(state) == len(jax.tree.leaves(run.program.abstract_state))
