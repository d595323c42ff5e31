"""bench/gpu.py, the GPU runner, on CPU (--smoke): results named by date, card and commit, each
part under its own cap and the run's deadline, a failing or cut part an error row, the summary
written whatever happened."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu, gpu_parts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(out):
  (path,) = [p for p in os.listdir(out) if p.endswith("-summary.json")]
  with open(os.path.join(out, path)) as f:
    return json.load(f)


def test_a_part_over_its_cap_is_an_error_row_and_the_others_keep_their_results(tmp_path):
  rc = gpu.main(["--smoke", "--parts=env,decode", "--caps=decode=2", "--deadline_s=200",
                 f"--out={tmp_path}"])
  assert rc == 1
  result = summary(tmp_path)
  env, decode = result["parts"]
  assert env["status"] == "ok" and env["files"] == [f"{result['prefix']}-env.json"]
  assert env["highlights"][env["files"][0]]["device"] == "cpu"
  assert result["prefix"].startswith(time.strftime("%Y-%m-%d", time.gmtime()) + "-cpu")
  assert (tmp_path / env["files"][0]).exists()
  assert decode["status"] == "error" and "decode cut at 2 s" in decode["error"]
  assert decode["seconds"] < 10 and decode["cap_s"] == 2


def test_the_run_ends_before_its_deadline_and_says_what_it_skipped(tmp_path):
  start = time.monotonic()
  gpu.main(["--smoke", "--parts=decode,env", "--caps=decode=100", "--deadline_s=16",
            f"--out={tmp_path}"])
  assert time.monotonic() - start < 16
  decode, env = summary(tmp_path)["parts"]
  assert decode["status"] == "error" and "cut at" in decode["error"]
  assert env == {"part": "env", "cap_s": 60, "status": "skipped", "why": "the run's deadline"}


def test_a_command_that_fails_raises_its_last_line(tmp_path):
  args = gpu.parse(["--smoke", f"--out={tmp_path}"])
  args.prefix, args.commit = "2026-12-03-cpu", None
  part = gpu.Part("x", 30, time.monotonic() + 30, args)
  with pytest.raises(gpu_parts.PartError, match="boom exited 3: the last line"):
    part.run([sys.executable, "-c", "print('first'); print('the last line'); raise SystemExit(3)"],
             "boom")
  assert (tmp_path / "2026-12-03-cpu-boom.log").read_text() == "first\nthe last line\n"


@pytest.mark.parametrize("names,want", [
    ([], "cpu"), (["NVIDIA H100 80GB HBM3"], "h100"), (["NVIDIA H200"], "h200"),
    (["NVIDIA H200"] * 2, "2xh200"), (["NVIDIA GeForce RTX 4090"], "geforcertx40")])
def test_the_card_in_the_names(names, want):
  assert gpu.card(names) == want


def test_a_name_without_a_commit_is_date_card():
  assert gpu.prefix("2026-12-03", "h200", "900c7ab4e1f0-dirty") == "2026-12-03-h200-900c7ab"
  assert gpu.prefix("2026-12-03", "h200", None) == "2026-12-03-h200"


@pytest.mark.parametrize("args,message", [
    (["--parts=env,nope"], "--parts: unknown part(s) ['nope']"),
    (["--caps=step=ten"], "--caps='step=ten': give part=seconds"),
    (["--deadline_s=5"], "--deadline_s=5: give more than 10 seconds"),
    (["--parity_seeds=a"], "--parity_seeds='a': give non-negative integers"),
    (["--parity_steps=100"], "--parity_steps=100: parity needs >= 600 steps"),
    (["--out={tmp}/a_file"], "--out={tmp}/a_file is a file: give a folder"),
])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, args, message):
  (tmp_path / "a_file").write_text("")
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  with pytest.raises(ValueError) as e:
    gpu.parse([f"--out={tmp_path}", *args])
  assert str(e.value).startswith(message.replace("{tmp}", str(tmp_path)))


def test_bad_flags_exit_2_with_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--parts=nope", f"--out={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --parts: unknown part")
  assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_the_help_names_the_wheels_install_line():
  assert "pip install -q --no-index --no-deps --target /tmp/site" in gpu.__doc__


def test_a_full_disk_ends_the_run_with_a_fault(tmp_path, monkeypatch, capsys):
  def full(path, obj):
    raise OSError(errno.ENOSPC, "No space left on device", path)
  monkeypatch.setattr(gpu.formats, "write_json_atomic", full)
  assert gpu.main(["--smoke", "--parts=env,decode", f"--out={tmp_path}"]) == 3
  assert "error: part env could not write its results" in capsys.readouterr().err
  assert not [p for p in os.listdir(tmp_path) if "decode" in p or "summary" in p]


def test_a_bench_without_an_out_path_names_its_file_by_date_card_and_commit():
  import bench
  date = time.strftime("%Y-%m-%d", time.gmtime())
  short = (bench.commit() or "").split("-")[0][:7]
  want = "-".join(x for x in (date, "h200", short) if x) + "-kernels.json"
  assert bench.result_path("kernels.json", ["NVIDIA H200"]) == os.path.join(
      REPO, "bench", "results", want)
  assert os.path.basename(bench.result_path("data.json", ["cpu"])).startswith(f"{date}-cpu")


def _processes_naming(text):
  out = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if text.encode() in f.read():
          out.append(int(pid))
    except OSError:
      pass
  return out


def test_sigterm_ends_the_running_part_with_the_runner(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "bench.gpu", "--smoke", "--parts=decode",
                           f"--out={out}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and len(_processes_naming(str(out))) < 2:
    time.sleep(0.2)  # the runner and its decode command
  assert len(_processes_naming(str(out))) >= 2
  proc.terminate()
  assert proc.wait(timeout=30) == 143
  deadline = time.monotonic() + 15  # a SIGKILLed JAX process takes a moment to exit on a busy box
  while time.monotonic() < deadline and _processes_naming(str(out)):
    time.sleep(0.2)
  assert _processes_naming(str(out)) == []
