"""The documents' references to measurements: every result file that README.md, docs/*.md or
bench/NOTES.md names exists in bench/results/, and every file there is named by its date, card
and commit (`2026-12-03-h200-900c7ab-decode.json`; date-card-what where the commit is unknown),
so a number in a doc leads to the file it came from."""

import glob
import itertools
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
CARD = r"(?:cpu|h100|h200|\d+xh100|\d+xh200)"
RESULT_NAME = re.compile(r"^\d{4}-\d\d-\d\d-" + CARD + r"-(?:[0-9a-f]{7}-)?[a-z0-9][\w.-]*$")
# A name as a doc writes it: optionally under bench/results/, with {a,b} alternatives and * globs;
# not a flag's value (`--out=bench/results/x.json` names a file to write, not one that exists).
MENTION = re.compile(r"(?<![=\w/.-])(?:bench/results/[\w.{},*-]*[\w*}]|\d{4}-\d\d-\d\d-" + CARD
                     + r"-[\w.{},*-]*[\w*}])")


def expand_braces(pattern):
  parts = re.split(r"(\{[^{}]*\})", pattern)
  choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
  return ["".join(c) for c in itertools.product(*choices)]


def mentions(text):
  return sorted({m.group(0).removeprefix("bench/results/") for m in MENTION.finditer(text)})


def missing_mentions(text, results_dir=RESULTS):
  out = []
  for name in mentions(text):
    for pattern in expand_braces(name):
      if not glob.glob(os.path.join(results_dir, pattern)):
        out.append(pattern)
  return out


def documents():
  paths = [os.path.join(REPO, "README.md"), os.path.join(REPO, "bench", "NOTES.md")]
  return paths + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def test_every_result_file_a_document_names_exists():
  missing = {}
  for path in documents():
    with open(path, encoding="utf-8") as f:
      gone = missing_mentions(f.read())
    if gone:
      missing[os.path.relpath(path, REPO)] = gone
  assert not missing, f"result files named but not in bench/results/: {missing}"


def test_result_files_are_named_by_date_card_and_commit():
  bad = [n for n in sorted(os.listdir(RESULTS)) if not RESULT_NAME.match(n)]
  assert not bad, f"name these date-card-commit-what (e.g. 2026-12-03-h200-900c7ab-decode.json): {bad}"


def test_the_check_sees_a_missing_file_and_expands_alternatives(tmp_path):
  (tmp_path / "2026-12-03-h200-900c7ab-decode.json").write_text("{}")
  (tmp_path / "2026-12-03-h200-900c7ab-step.json").write_text("{}")
  text = ("see `bench/results/2026-12-03-h200-900c7ab-{decode,step}.json` and "
          "2026-12-03-h200-900c7ab-*.json, but not 2026-12-04-h100-1234567-decode.json nor "
          "bench/results/step-1xh200-2026-11-28.json; --out=bench/results/new.json is written")
  assert missing_mentions(text, str(tmp_path)) == ["2026-12-04-h100-1234567-decode.json",
                                                   "step-1xh200-2026-11-28.json"]
  assert mentions("2026-12-03, H200, 900c7ab: no file named") == []
