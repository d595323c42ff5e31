"""Chat data (data/chat.py): the template renders as transformers' Jinja does, the loss mask is
exactly the assistant's tokens, bad rows are counted by kind, overflow is dropped or cut."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sft_helpers  # noqa: E402

from tinyllama_jax import config as config_lib  # noqa: E402
from tinyllama_jax.data import chat, pipeline  # noqa: E402
from tinyllama_jax.data.config import data_config  # noqa: E402

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
        {"role": "user", "content": "And json.loads?"},
        {"role": "assistant", "content": "Deserialize s (ünïcödé) to a Python object."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return sft_helpers.make_tokenizer(tmp_path_factory.mktemp("chat_tok") / "tokenizer.model")


def runs(mask):
  """[(start, end)] of the 1-runs of a 0/1 array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_default_template_renders_as_jinja_does():
  jinja = chat._jinja_renderer(chat.ZEPHYR_TEMPLATE)  # what transformers compiles
  for n in range(len(CONV) + 1):
    for gen in (False, True):
      assert chat._render_zephyr(CONV[:n], "</s>", gen) == jinja(CONV[:n], "<s>", "</s>", gen)
  assert chat._render_zephyr(CONV[1:3], "</s>", False) == (
      "<|user|>\nWhat does json.dumps do?</s>\n<|assistant|>\nSerialize obj to a JSON formatted "
      "str.</s>\n")
  assert chat._render_zephyr(CONV[1:2], "</s>", True).endswith("</s>\n<|assistant|>\n")


def test_mask_is_exactly_the_assistant_content_and_eos(tok):
  fmt = chat.ChatFormat("", tok)
  ids, mask = fmt.conversation(CONV)
  assert len(ids) == len(mask) and set(mask.tolist()) == {0, 1}
  (s1, e1), (s2, e2) = runs(mask)  # two assistant turns, multi-turn
  for (s, e), content in (((s1, e1), CONV[2]["content"]), ((s2, e2), CONV[4]["content"])):
    assert ids[e - 1] == tok.eos_id  # the closing </s> is trained
    assert tok.decode(ids[s:e - 1]) == content  # and exactly the content before it
    # the header before it is not: '<|assistant|>\n' ends right at s
    assert tok.decode(ids[:s]).endswith("<|assistant|>\n")
  # every other token (system, users, headers, the newline after </s>) has mask 0
  assert int(mask.sum()) == (e1 - s1) + (e2 - s2)
  # the ids equal one encoding of the whole rendered text cut at its special tokens
  text = fmt.render(CONV)
  want = []
  for k, part in enumerate(text.split("</s>")):
    want += ([tok.eos_id] if k else []) + (tok.encode(part) if part else [])
  assert ids.tolist() == want


def test_prompt_ends_with_the_generation_header(tok):
  fmt = chat.ChatFormat("", tok)
  ids = fmt.prompt(CONV[:2])
  full, _ = fmt.conversation(CONV[:3])
  assert full[:len(ids)].tolist() == ids  # the prompt is a prefix of the trained conversation


def test_custom_jinja_template_masks_its_assistant_turns(tok, tmp_path):
  chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
            "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
            "\n' }}{% endif %}")
  fmt = chat.ChatFormat(chatml, tok)
  ids, mask = fmt.conversation(CONV[1:3])
  (s, e), = runs(mask)
  assert tok.decode(ids[s:e]) == CONV[2]["content"] + "<|im_end|>"
  no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
               "{% endif %}" + chatml)
  path = sft_helpers.write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}, {"messages": CONV[1:]}])
  convs, stats = chat.load_conversations([path], chat.ChatFormat(no_system, tok), 1000, "drop")
  assert (len(convs), stats.skipped_template_error) == (1, 1)
  with pytest.raises(ValueError, match="not prefix-stable"):
    chat.ChatFormat("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                    "{% endfor %}", tok).conversation(CONV[1:3])


def test_bad_rows_are_skipped_and_counted_by_kind(tmp_path, tok):
  good = {"messages": CONV[1:3]}
  path = sft_helpers.write_jsonl(tmp_path / "c.jsonl", [
      good, "{not json", {"messages": "hello"}, {"text": "no messages"},
      {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
      {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
      {"messages": [{"role": "user", "content": "only a question"}]}, good])
  convs, stats = chat.load_conversations([path], chat.ChatFormat("", tok), 1000, "drop")
  assert len(convs) == stats.conversations == 2
  assert (stats.skipped_invalid_json, stats.skipped_not_a_list, stats.skipped_unknown_role,
          stats.skipped_not_string, stats.skipped_no_assistant) == (1, 2, 1, 1, 1)
  assert stats.skipped() == 6 and [c[0] for c in convs] == ["c.jsonl:1", "c.jsonl:8"]


def test_a_file_without_a_valid_conversation_is_one_line(tmp_path, tok):
  path = sft_helpers.write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": []}])
  with pytest.raises(ValueError, match=r"bad.jsonl has no valid conversation \(2 rows skipped"):
    chat.load_conversations([path], chat.ChatFormat("", tok), 1000, "drop")


def test_overflow_drop_and_truncate_are_counted(tmp_path, tok):
  long = {"messages": [{"role": "user", "content": "Tell me everything."},
                       {"role": "assistant", "content": "word " * 200}]}
  path = sft_helpers.write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV[1:3]}, long])
  fmt = chat.ChatFormat("", tok)
  convs, stats = chat.load_conversations([path], fmt, 64, "drop")
  assert (len(convs), stats.overflow_dropped, stats.overflow_truncated) == (1, 1, 0)
  convs, stats = chat.load_conversations([path], fmt, 64, "truncate")
  assert (len(convs), stats.overflow_dropped, stats.overflow_truncated) == (2, 0, 1)
  assert len(convs[1][1]) == 64 and convs[1][2][-1] == 1  # cut inside the reply


def test_packed_batches_carry_the_mask_and_segments(tmp_path, tok):
  chat_path, _ = sft_helpers.write_data(str(tmp_path))
  cfg = data_config()
  cfg.update(source="chat", paths=chat_path, tokenizer=tok.path, packing="first_fit",
             num_packing_bins=8, eval_fraction=0.1)
  it = pipeline.make_iterator(cfg, split="train", seq_len=128, batch_size=4, seed=0,
                              process_index=0, process_count=1, tokenizer=tok, vocab_size=512)
  batch = next(it)
  seg, mask, targets = batch["segment_ids"], batch["loss_mask"], batch["targets"]
  assert mask.sum() > 0 and not mask[seg == 0].any()
  for row in range(4):  # each conversation's trained targets end with its </s>
    for s in set(seg[row].tolist()) - {0}:
      trained = targets[row][(seg[row] == s) & (mask[row] > 0)]
      assert len(trained) and trained[-1] == tok.eos_id
  # positions restart per conversation: nothing attends across (segment ids)
  assert (batch["positions"][seg != 0] < 128).all() and (batch["positions"][:, 0] == 0).all()
  it.close()


def test_config_rules_for_chat():
  cfg = config_lib.base_config()
  cfg.data.source, cfg.data.paths, cfg.data.tokenizer = "chat", "x.jsonl", "t.model"
  with pytest.raises(ValueError, match="data.packing=first_fit"):
    config_lib.validate(cfg)
  cfg.data.packing, cfg.data.tokenizer = "first_fit", ""
  with pytest.raises(ValueError, match="needs a tokenizer: set train.init_from"):
    config_lib.validate(cfg)
  cfg.train.init_from = "runs/base"
  config_lib.validate(cfg)
  cfg.data.chat_overflow = "wrap"
  with pytest.raises(ValueError, match="data.chat_overflow='wrap' must be one of drop, truncate"):
    config_lib.validate(cfg)
  assert json.loads(config_lib.to_json(cfg))["data"]["chat_template"] == ""


def test_sft_1b_config_names_its_missing_data_in_one_line():
  cfg = config_lib.load_config_file(os.path.join(os.path.dirname(sft_helpers.__file__), "..",
                                                 "configs", "sft_1b.py"))
  with pytest.raises(ValueError, match=r"data.source='chat' needs data.paths: the chat files"):
    config_lib.validate(cfg)
  cfg.data.paths, cfg.train.init_from = "/data/ultrachat/*.parquet", "runs/1b"
  config_lib.validate(cfg)
  assert (cfg.optim.lr, cfg.train.global_batch, cfg.train.seq_len) == (2e-5, 128, 2048)


def test_parquet_and_zstd_chat_files(tmp_path, tok):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  rows = [{"messages": CONV[1:3]}, {"messages": CONV}]
  pq.write_table(pa.table({"messages": [r["messages"] for r in rows]}), tmp_path / "c.parquet")
  raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
  (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
  fmt = chat.ChatFormat("", tok)
  a, _ = chat.load_conversations([str(tmp_path / "c.parquet")], fmt, 1000, "drop")
  b, _ = chat.load_conversations([str(tmp_path / "c.jsonl.zst")], fmt, 1000, "drop")
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x[1], y[1])
    np.testing.assert_array_equal(x[2], y[2])


# The output rows get a time bound they cannot reach on a loaded machine, so the bound they name
# is the one that stops them.
@pytest.mark.parametrize("template, message, seconds", [
    ("{{ 'A' * 10**10 }}", "rendered more than 10,000,000 characters", 60),  # was a MemoryError
    ("{{ [1] * 10**9 }}", "rendered more than", 60),
    ("{{ 10 ** 100000000 }}", "rendered more than", 60),  # a number of 100M digits
    ("{% for i in range(99999) %}{% for j in range(99999) %}{{ 'xyz' * 9 }}{% endfor %}"
     "{% endfor %}", "rendered more than", 60),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "took more than 0.5 s", 0.5),  # output-free: hung
])
def test_a_template_without_bound_is_stopped_in_one_line(tok, monkeypatch, template, message,
                                                         seconds):
  monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", seconds)
  fmt = chat.ChatFormat(template, tok)
  with pytest.raises(chat.TemplateUnbounded, match=message) as e:
    fmt.render(CONV)
  assert "\n" not in str(e.value)
  assert isinstance(e.value, ValueError)  # the commands' one line, exit 2


def test_jinja2_is_a_declared_dependency_and_its_absence_is_one_line(tok, monkeypatch):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with open(os.path.join(root, "requirements.txt")) as f:
    assert any(line.split(">")[0].strip() == "jinja2" for line in f)
  monkeypatch.setitem(sys.modules, "jinja2", None)  # as on an install without it
  with pytest.raises(ValueError, match="needs jinja2, which is not installed: pip install -r"):
    chat.ChatFormat("{{ messages }}", tok).render(CONV)
