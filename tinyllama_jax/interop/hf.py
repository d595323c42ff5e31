"""The Hugging Face Llama format: names, config, safetensors files and the tokenizer files.

No transformers or torch here: export and import run on machines that have neither.

Names and layouts are params.py's table: each of our parameters (stacked over L) is one HF
tensor a layer, a PyTorch Linear's weight [out, in] for the matrices (ours are [in, out], with
heads as their own axes: wq [D, H, Dh] is q_proj's [H*Dh, D]), as ours for the norms and the
embedding table.

RoPE is rotate-half on both sides, so q/k need no permutation.
"""

import json
import math
import os
import shutil

import ml_dtypes
import numpy as np

from tinyllama_jax import params

# Buffers older exports carry: recomputed by every loader, safe to skip (and counted in the log).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _to_torch(param, w):
  """One layer's (or a top-level) array in HF's layout: [in..., out...] -> [out, in]."""
  if param.hf_in_dims is None:
    return w
  return w.reshape(int(np.prod(w.shape[:param.hf_in_dims])), -1).T


def to_hf(path, x):
  """One of our (stacked) parameters -> [(hf_name, array)], PyTorch layout."""
  param = params.lookup(path)
  if path[0] != "layers":
    return [(param.hf_name, _to_torch(param, x))]
  return [(param.hf_name.format(i=i), _to_torch(param, x[i])) for i in range(x.shape[0])]


def from_hf(path, shape, get):
  """The inverse of `to_hf`: builds our parameter of `shape` with `get(hf_name)` -> array."""
  param = params.lookup(path)
  ours = lambda w, shape: w if param.hf_in_dims is None else w.T.reshape(shape)
  if path[0] != "layers":
    return ours(get(param.hf_name), shape)
  out = None  # filled layer by layer: one copy of the parameter, not a list plus its stack
  for i in range(shape[0]):
    w = ours(get(param.hf_name.format(i=i)), shape[1:])
    if out is None:
      out = np.empty((shape[0],) + w.shape, w.dtype)
    out[i] = w
  return out


def hf_shapes(cfg_model):
  """{hf_name: shape} in file order, computed without any array."""
  out = {}
  for path, shape in params.shapes(cfg_model):
    for name, x in to_hf(path, np.broadcast_to(np.zeros((), np.int8), shape)):
      out[name] = x.shape
  return out


# ----------------------------------------------------------------------------- config.json

_SUPPORTED_ROPE = (None, "default")


def hf_config(cfg_model, *, bos_id, eos_id, dtype_name):
  """config.json for LlamaForCausalLM. rope_theta is written both flat (transformers 4, vLLM,
  llama.cpp converters) and as rope_parameters (transformers 5's own spelling)."""
  m = cfg_model
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_dim,
      "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
      "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
      "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
      "tie_word_embeddings": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
      "initializer_range": params.init_stds(m)[0],
      "pretraining_tp": 1, "use_cache": True, "torch_dtype": dtype_name, "dtype": dtype_name,
  }


def model_fields_from_hf(hf_cfg, source):
  """Our model.* fields from a HF config.json; one clear error for anything not Llama-shaped."""
  def refuse(why):
    raise ValueError(f"{source} is not a Llama model this code can load ({why}): only "
                     "LlamaForCausalLM checkpoints (model_type 'llama') are supported")
  model_type = hf_cfg.get("model_type")
  archs = hf_cfg.get("architectures") or ["LlamaForCausalLM"]
  if model_type != "llama" or archs != ["LlamaForCausalLM"]:
    refuse(f"model_type {model_type!r}, architectures {archs}")
  if hf_cfg.get("hidden_act", "silu") != "silu":
    refuse(f"hidden_act {hf_cfg['hidden_act']!r}, not 'silu'")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_cfg.get(flag):
      refuse(f"{flag} is set; our Llama has no biases")
  rope = hf_cfg.get("rope_parameters") or {}
  scaling = hf_cfg.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type")))
  if rope_type not in _SUPPORTED_ROPE:
    refuse(f"RoPE scaling {rope_type!r}; only plain RoPE is implemented")
  theta = hf_cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
  missing = [k for k in required if k not in hf_cfg]
  if missing:
    refuse(f"config.json lacks {', '.join(missing)}")
  field = lambda key, default=None: _checked_field(hf_cfg, key, default, source)
  H = field("num_attention_heads")
  return {
      "vocab_size": field("vocab_size"), "d_model": field("hidden_size"),
      "n_layers": field("num_hidden_layers"), "n_heads": H,
      "n_kv_heads": field("num_key_value_heads", H),
      "head_dim": field("head_dim", field("hidden_size") // H),
      "ffn_dim": field("intermediate_size"),
      "max_seq_len": field("max_position_embeddings", 2048),
      "rope_theta": _checked_real("rope_theta", theta, source),
      "norm_eps": _checked_real("rms_norm_eps", hf_cfg.get("rms_norm_eps", 1e-6), source),
  }


def _checked_field(hf_cfg, key, default, source):
  """A count of config.json (heads, layers, sizes): a positive JSON integer; null or absent is
  `default`. `2.0`, `"1000"` or `true` would reach the config as another type."""
  value = hf_cfg.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{source}/config.json: {key}={json.dumps(value)} must be a positive "
                     "integer (a JSON number without a decimal point): fix the file")
  return value


def _checked_real(key, value, source):
  """rope_theta / rms_norm_eps: a finite number > 0 (NaN, inf or <= 0 give NaN activations)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
    raise ValueError(f"{source}/config.json: {key}={json.dumps(value)} must be a finite number "
                     "> 0: fix the file")
  return float(value)


# ----------------------------------------------------------------------------- safetensors

_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def parse_size(text, flag="--max_shard_size"):
  """'2GB', '500MB', '123' (bytes); 0 means one file. Anything else (a negative, nan or
  overflowing size, no number) is one error naming `flag`, before anything is written."""
  number, scale = str(text).strip().upper(), 1
  for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if number.endswith(suffix):
      number, scale = number[:-len(suffix)], factor
      break
  try:
    size = float(number) * scale
  except ValueError:
    size = math.nan
  if not 0 <= size < 2**63:
    raise ValueError(f"{flag}={text} is not a size: give bytes, or a number with GB, MB or KB "
                     "(e.g. 2GB), at least 0 (0 = one file)")
  return int(size)


def plan_shards(shapes, dtype, max_shard_bytes):
  """[(file_name, [(hf_name, shape)])]: consecutive tensors, each file at most max_shard_bytes
  (a single tensor larger than that gets a file of its own)."""
  itemsize = np.dtype(dtype).itemsize
  groups, size = [[]], 0
  for name, shape in shapes.items():
    nbytes = int(np.prod(shape)) * itemsize
    if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((name, shape))
    size += nbytes
  if len(groups) == 1:
    return [("model.safetensors", groups[0])]
  n = len(groups)
  return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardWriter:
  """Writes planned safetensors files tensor by tensor, in any order: the headers are known up
  front from the shapes, so nothing but the tensor being written is held in memory."""

  def __init__(self, directory, plan, dtype):
    self.dtype = np.dtype(dtype)
    self.where = {}  # hf_name -> (file handle, absolute offset, shape)
    self.files = []
    self.written = set()
    for file_name, tensors in plan:
      header, offset = {}, 0
      for name, shape in tensors:
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[self.dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
      header["__metadata__"] = {"format": "pt"}
      blob = json.dumps(header, separators=(",", ":")).encode()
      blob += b" " * (-len(blob) % 8)  # the data start stays 8-byte aligned
      f = open(os.path.join(directory, file_name), "wb")
      f.write(len(blob).to_bytes(8, "little") + blob)
      f.truncate(8 + len(blob) + offset)
      self.files.append(f)
      for name, shape in tensors:
        self.where[name] = (f, 8 + len(blob) + header[name]["data_offsets"][0], tuple(shape))

  def write(self, name, x):
    f, offset, shape = self.where[name]
    if tuple(x.shape) != shape:
      raise ValueError(f"tensor {name} has shape {x.shape}, planned {shape}")
    f.seek(offset)
    f.write(np.ascontiguousarray(x, dtype=self.dtype).tobytes())
    self.written.add(name)

  def close(self):
    for f in self.files:
      f.close()

  def check_complete(self):
    missing = set(self.where) - self.written
    if missing:
      raise ValueError(f"tensors never written: {sorted(missing)[:3]}...")


def write_index(directory, plan, dtype):
  total = sum(int(np.prod(s)) for _, ts in plan for _, s in ts) * np.dtype(dtype).itemsize
  index = {"metadata": {"total_size": total},
           "weight_map": {name: f for f, ts in plan for name, _ in ts}}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)


class SafetensorsReader:
  """Reads a HF directory's safetensors files; `get(name)` reads one tensor as fp32. Each read is
  a plain file read into a fresh buffer, not a memory map: the pages of a map stay in the
  process's RSS while it is open, the whole file's worth by the end of an import."""

  def __init__(self, directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
      pickles = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
      if pickles:
        raise ValueError(
            f"{directory} holds only pickle weights ({pickles[0]}); pickle is refused. Convert "
            "them once where you trust the file: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{directory}').save_pretrained("
            f"'{directory}-safetensors')\", then import that directory")
      raise ValueError(f"{directory} has no model.safetensors: give a Hugging Face model directory")
    self.tensors = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise ValueError(f"{path} is listed in the index but missing: the download is incomplete")
      n, header = _read_header(path)
      for tensor, info in header.items():
        self.tensors[tensor] = (path, 8 + n, info)

  def names(self):
    return list(self.tensors)

  def get_finite(self, name):
    """get(name), refused when it holds NaN or inf: training from it would be NaN from step 1."""
    x = self.get(name)
    if not np.isfinite(x).all():
      bad = int(x.size - np.isfinite(x).sum())
      raise ValueError(f"{self.tensors[name][0]}: tensor {name} holds {bad} NaN or inf values: "
                       "the checkpoint is damaged; download or convert it again")
    return x

  def get(self, name):
    if name not in self.tensors:
      raise ValueError(f"the checkpoint has no tensor {name!r}: not a complete Llama checkpoint")
    path, start, info = self.tensors[name]
    begin, end = info["data_offsets"]
    raw = np.empty(end - begin, np.uint8)
    with open(path, "rb") as f:
      f.seek(start + begin)
      got = f.readinto(raw)
    if got != end - begin:
      raise ValueError(f"{path} is truncated: tensor {name} needs bytes {start + begin}.."
                       f"{start + end}, the file ends before: the download is incomplete")
    x = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return x.astype(np.float32, copy=False)  # fp32 on disk: no second copy


def _read_header(path):
  """(header length, {tensor: info}) of a safetensors file, every entry checked against the file:
  a damaged header is one line naming the file and the field, not a MemoryError or KeyError."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or not 2 <= n <= min(size - 8, _MAX_HEADER_BYTES):
      raise ValueError(f"{path}: the header length field says {n} bytes, the file has {size}: "
                       "not a safetensors file, or a damaged one; download it again")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: the header is not JSON ({e}): download the file again") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the header is not a JSON object: download the file again")
  header.pop("__metadata__", None)
  for tensor, info in header.items():
    problem = _header_problem(info, size - 8 - n)
    if problem:
      raise ValueError(f"{path}: tensor {tensor} {problem}: download or convert the file again")
  return n, header


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def _header_problem(info, data_bytes):
  """What is wrong with one tensor's header entry, or None."""
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
    return "lacks dtype, shape or data_offsets in the header"
  if info["dtype"] not in _DTYPES:
    return f"has dtype {info['dtype']!r}, not a float type ({', '.join(_DTYPES)})"
  shape, offsets = info["shape"], info["data_offsets"]
  ints = lambda v: isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)
  if not ints(shape) or not ints(offsets) or len(offsets) != 2:
    return f"has shape {shape!r} and data_offsets {offsets!r}: not lists of non-negative integers"
  begin, end = offsets
  if end - begin != math.prod(shape) * _DTYPES[info["dtype"]].itemsize:
    return f"has data_offsets {offsets}, not the size of shape {shape} in {info['dtype']}"
  if end > data_bytes:
    return f"needs data bytes up to {end}, the file holds {data_bytes} (it is truncated)"
  return None


# ----------------------------------------------------------------------------- tokenizer


def _sp_proto(path):
  from sentencepiece import sentencepiece_model_pb2  # protobuf: loaded only for export
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def tokenizer_json(sp_model_path, *, add_bos, add_eos):
  """A `tokenizers` BPE equal to the sentencepiece model, as tokenizer.json's dict.

  Written by us, not by transformers' slow->fast conversion: that one pre-tokenizes with
  Metaspace(prepend_scheme='first'), which drops sentencepiece's dummy prefix when the text
  starts with a space, so ' x' encodes differently. Llama-2's own tokenizer.json spells the
  normalizer below (always prepend '▁', spaces -> '▁'), which matches sentencepiece exactly.
  Returns None (with the reason) for models this recipe does not cover.
  """
  proto = _sp_proto(sp_model_path)
  spec = proto.normalizer_spec
  if proto.trainer_spec.model_type != 2:  # 2 = BPE
    return None, "not a BPE sentencepiece model"
  if spec.name != "identity" or spec.remove_extra_whitespaces or len(spec.precompiled_charsmap):
    return None, f"sentencepiece normalizer {spec.name!r} has no exact tokenizers equivalent"
  normal, unknown, control = 1, 2, 3  # sentencepiece piece types
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  # A merge (a, b) for every normal piece that splits into two normal pieces, ranked by the
  # merged piece's score: sentencepiece's BPE merges the highest-scoring pair first.
  mergeable = {p.piece for p in proto.pieces if p.type == normal}
  merges = []
  for p in sorted((p for p in proto.pieces if p.type == normal), key=lambda p: -p.score):
    splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
    merges += sorted((s for s in splits if s[0] in mergeable and s[1] in mergeable),
                     key=lambda s: (vocab[s[0]], vocab[s[1]]))
  specials = [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type in (control, unknown)]
  unk = next(p.piece for p in proto.pieces if p.type == unknown)
  bos = proto.pieces[proto.trainer_spec.bos_id].piece
  eos = proto.pieces[proto.trainer_spec.eos_id].piece

  def template(sequence, type_id):
    return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if add_bos else []) + \
        [{"Sequence": {"id": sequence, "type_id": type_id}}] + \
        ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if add_eos else [])
  post_specials = {t: {"id": t, "ids": [vocab[t]], "tokens": [t]}
                   for t, on in ((bos, add_bos), (eos, add_eos)) if on}
  prefix = [{"type": "Prepend", "prepend": "▁"}] if spec.add_dummy_prefix else []
  decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
              {"type": "ByteFallback"}, {"type": "Fuse"}]
  if spec.add_dummy_prefix:
    decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True}
                       for i, t in specials],
      "normalizer": {"type": "Sequence", "normalizers": prefix + [
          {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
      "pre_tokenizer": None,
      "post_processor": {"type": "TemplateProcessing", "single": template("A", 0),
                         "pair": template("A", 0) + template("B", 1),
                         "special_tokens": post_specials},
      "decoder": {"type": "Sequence", "decoders": decoders},
      "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                "merges": [list(m) for m in merges]},
  }, None


def write_tokenizer(directory, sp_model_path, *, add_bos, add_eos, max_len, log, extra=None):
  """tokenizer.model, tokenizer.json (when exact), tokenizer_config.json (with `extra`'s keys on
  top: a chat run's template) and special_tokens_map.json; returns (bos_id, eos_id)."""
  shutil.copyfile(sp_model_path, os.path.join(directory, "tokenizer.model"))
  proto = _sp_proto(sp_model_path)
  t = proto.trainer_spec
  special = {name: proto.pieces[i].piece for name, i in
             (("bos_token", t.bos_id), ("eos_token", t.eos_id), ("unk_token", t.unk_id)) if i >= 0}
  tok_json, why_not = tokenizer_json(sp_model_path, add_bos=add_bos, add_eos=add_eos)
  config = {**special, "add_bos_token": add_bos, "add_eos_token": add_eos,
            "model_max_length": max_len, "clean_up_tokenization_spaces": False,
            "pad_token": None,
            # '<s>' typed in a text is text, as in training (sentencepiece never emits a control
            # piece from text); transformers would otherwise read it as BOS.
            "split_special_tokens": True}
  if tok_json is not None:
    # PreTrainedTokenizerFast loads tokenizer.json as written; LlamaTokenizer would rebuild the
    # pre-tokenizer (see tokenizer_json).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      json.dump(tok_json, f, ensure_ascii=False)
  else:
    config["tokenizer_class"] = "LlamaTokenizer"
    log(f"tokenizer.json not written ({why_not}): transformers will convert tokenizer.model "
        "itself, which may differ from sentencepiece on text that starts with a space")
  config.update(extra or {})
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  return t.bos_id, t.eos_id
