"""`generate` given what a careless or hostile user gives it: each row one line and its exit
status (tests/hostile.py). The run is the imported random Llama of hf_models, once a module;
its chat template (tokenizer_config.json's, carried by the import) repeats without bound."""

import dataclasses

import pytest

from hf_models import hostile_runs
from hostile import OLD_RUN, Probe, call, check

W = "--workdir={tmp}/run"
PROBES = [
    Probe("empty prompts file", (W, "--prompts_file={tmp}/empty.txt"), 2,
          "--prompts_file='{tmp}/empty.txt' has no prompt"),
    Probe("latin-1 prompts file", (W, "--prompts_file={tmp}/latin1.txt"), 2,
          "--prompts_file='{tmp}/latin1.txt' is not UTF-8 text"),
    Probe("temperature inf", (W, "--prompt=a", "--temperature=inf"), 2, "--temperature=inf: use 0"),
    Probe("temperature 1e-45", (W, "--prompt=a", "--temperature=1e-45"), 2,
          "--temperature=1e-45: use 0"),
    Probe("tokenizer above the vocab", (W, "--prompt=a", "--tokenizer={tmp}/big.model"), 2,
          "the tokenizer {tmp}/big.model has 1024 pieces, more than the model's vocab_size 512"),
    Probe("the run's copy edited", ("--workdir={tmp}/edited", "--prompt=a"), 2,
          "the tokenizer {tmp}/edited/tokenizer/tokenizer.model (sha256"),
    Probe("a chat template without bound", (W, "--chat", "--prompt=hi"), 2,
          "data.chat_template rendered more than"),
    Probe("a run without a tokenizer", (f"--workdir={OLD_RUN}", "--prompt=a"), 2,
          f"the run in {OLD_RUN} has no tokenizer (synthetic data): generate writes text"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, tokenizer_file):
  root = hostile_runs(tmp_path_factory.mktemp("generate_hostile"), tokenizer_file,
                      chat_template="{{ 'A' * 10**10 }}")
  (root / "empty.txt").write_text("\n  \n")
  (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  return root


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_generate_hostile(probe, tmp, capfd):
  check("generate", dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp))),
        tmp, capfd)


def test_another_tokenizer_is_used_when_allowed_with_a_warning(tmp, capfd):
  proc = call("generate", (W, "--prompt=a", "--prompt=b", "--max_new_tokens=2",
                           "--tokenizer={tmp}/swapped.model", "--allow_other_tokenizer"),
              tmp, capfd)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--allow_other_tokenizer: using it anyway" in proc.stderr
