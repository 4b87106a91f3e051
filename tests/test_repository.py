"""The repository's files carry no machine paths and speak of the project only."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Built from parts, so that this file does not match itself.
MACHINE_PATHS = ("/tmp/" + "lead", "/" + "work" + "/")
WHO_RAN_IT = re.compile(r"\b" + "ag" + r"ents?\b", re.IGNORECASE)   # who ran what, not the project


def tracked_text_files():
  try:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  for path in filter(None, listing.split("\0")):
    full = os.path.join(REPO, path)
    if not os.path.isfile(full):   # deleted in the work tree, or a submodule
      continue
    with open(full, "rb") as f:
      data = f.read()
    if b"\0" in data:   # binary (images)
      continue
    try:
      yield path, data.decode("utf-8")
    except UnicodeDecodeError:
      continue


def test_tracked_files_have_no_machine_paths_and_no_words_about_who_ran_what():
  hits = [f"{path}:{number}: {line.strip()[:120]}"
          for path, text in tracked_text_files()
          for number, line in enumerate(text.splitlines(), 1)
          if any(p in line for p in MACHINE_PATHS) or WHO_RAN_IT.search(line)]
  assert not hits, ("machine paths or words about who ran what (write what the project does, "
                    "with paths relative to the repository):\n" + "\n".join(hits))


def test_the_check_finds_what_it_looks_for():
  assert WHO_RAN_IT.search("measured while " + "another ag" + "ent's train.py ran")
  assert WHO_RAN_IT.search("Other " + "Ag" + "ents' jobs")
  assert not WHO_RAN_IT.search("a reagent; agentic")
  assert any(p in "run through " + "/tmp/" + "lead/measure" for p in MACHINE_PATHS)
