# The README's quickstart is what CI runs: its two commands appear word for word in .ci/run.
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if re.match(r"^ {4}\S", line)]


def test_ci_runs_the_readme_quickstart():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    ci = [line.strip() for line in open(os.path.join(REPO, ".ci", "run")).read().splitlines()]
    for command in commands:
        assert command in ci, command
    assert any("pytest" in c for c in commands) and any("generate.py" in c for c in commands)
