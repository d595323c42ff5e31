"""Shared by the interop, inference and checkpoint tests: real text from the stdlib, a small
sentencepiece model, a random Hugging Face Llama imported as a run (`imported`) and exported back
(`exported`), and the logits of both stacks. Test files import the fixtures by name (or their
folder's conftest.py does). The fixtures are session-scoped, so read-only: a test that changes a
run changes a copy."""

import glob
import json
import os
import shutil
import sysconfig

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tinyllama_jax.interop import export, hf_import
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.model import Llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]


def stdlib_texts(pattern="json/*.py"):
  paths = sorted(glob.glob(os.path.join(STDLIB, pattern)))
  return [open(p, encoding="utf-8").read() for p in paths]


def make_tokenizer(path, vocab_size=512):
  return tokenizer_lib.train_tokenizer(stdlib_texts("email/*.py") + stdlib_texts(), path,
                                       vocab_size)


def make_hf_llama(directory, tokenizer_path=None, **overrides):
  """A random LlamaForCausalLM with GQA saved as safetensors (+ tokenizer.model if given).
  A large init range makes its next-token choices confident, so greedy decoding has no ties."""
  fields = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                initializer_range=0.2, bos_token_id=1, eos_token_id=2)
  fields.update(overrides)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
  with torch.no_grad():  # norm weights are 1 at init: make them matter (a transposed norm shows)
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(directory)
  if tokenizer_path:
    shutil.copyfile(tokenizer_path, os.path.join(directory, "tokenizer.model"))
  return model


def our_logits(params, cfg_model, tokens_BT):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg_model, rngs=nnx.Rngs(params=0))))
  return np.asarray(nnx.merge(graphdef, jax.device_put(params))(np.asarray(tokens_BT)))


def hf_logits(model, tokens_BT):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BT))).logits.float().numpy()


def load_hf(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                           dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
  return make_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.model")).path


@pytest.fixture(scope="session")
def imported(tmp_path_factory, tokenizer_file):
  """(hf_dir, hf_model, workdir): a random HF Llama and its import as a run."""
  root = tmp_path_factory.mktemp("interop")
  hf_dir, workdir = str(root / "hf"), str(root / "run")
  model = make_hf_llama(hf_dir, tokenizer_file)
  hf_import.import_hf(hf_dir, workdir, base_config_path=os.path.join(REPO, "configs/tiny.py"))
  return hf_dir, model, workdir


TOKENS = np.random.default_rng(0).integers(0, 512, (2, 17))


# ----------------------------------------------------------------------------- import


@pytest.fixture(scope="session")
def exported(imported, tmp_path_factory):
  """(params, cfg, tokenizer, workdir, HF model loaded from our fp32 export) of the import."""
  _, _, workdir = imported
  out = str(tmp_path_factory.mktemp("exported") / "hf")
  export.export(workdir, out, dtype="fp32")
  cfg = run_lib.run_config(workdir, 0)
  params = jax.device_put(run_lib.load_params(workdir, 0, cfg.model))
  tok = tokenizer_lib.Tokenizer(run_lib.tokenizer_path(cfg, workdir))
  return params, cfg, tok, workdir, load_hf(out)


def swap_two_pieces(src, dst):
  """A copy of the sentencepiece model `src` with two ordinary pieces' ids swapped: the same
  vocab size, another sha256, and wrong text for every id of either piece."""
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  with open(src, "rb") as f:
    proto.ParseFromString(f.read())
  a, b = proto.pieces[100], proto.pieces[101]
  a.piece, b.piece = b.piece, a.piece
  with open(dst, "wb") as f:
    f.write(proto.SerializeToString())
  return dst


def hostile_runs(root, tokenizer_file, chat_template=None):
  """What the hostile-input modules of generate, evaluate and export probe, under `root`: run/
  (a random HF Llama imported, with `chat_template` in its tokenizer_config.json), edited/ (a
  copy whose tokenizer copy has two pieces swapped), swapped.model and big.model (1024 pieces,
  above the model's 512)."""
  hf_dir = str(root / "hf")
  make_hf_llama(hf_dir, tokenizer_file)
  if chat_template is not None:
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
      json.dump({"chat_template": chat_template}, f)
  hf_import.import_hf(hf_dir, str(root / "run"))
  shutil.copytree(root / "run", root / "edited")
  swap_two_pieces(tokenizer_file, str(root / "edited/tokenizer/tokenizer.model"))
  swap_two_pieces(tokenizer_file, str(root / "swapped.model"))
  make_tokenizer(str(root / "big.model"), vocab_size=1024)
  return root
