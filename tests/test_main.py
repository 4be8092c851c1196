import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedloss.cli.main import format_losses, main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_python_dash_m_lists_losses():
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-m", "embedloss", "list"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.splitlines()[0].split()[:3] == ["name", "category", "class"]
    assert any(line.startswith("simclr ") and "nt_xent" in line for line in out.stdout.splitlines())


def test_list_formats(capsys):
    rows = json.loads(format_losses("json"))
    assert {"name": "clip", "category": "multimodal"}.items() <= rows[
        [r["name"] for r in rows].index("clip")
    ].items()
    md = format_losses("markdown", "contrastive").splitlines()
    assert md[0].startswith("| name |") and all("multimodal" not in line for line in md)
    assert main(["list", "--format", "json", "--category", "multimodal"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "clip" in [r["name"] for r in listed]
    assert {r["category"] for r in listed} == {"multimodal"}


def test_info_and_unknown_name(capsys):
    assert main(["info", "nt_xent"]) == 0
    text = capsys.readouterr().out
    assert "SimCLRLoss" in text and "temperature" in text and "0.5" in text
    assert main(["info", "clipp"]) == 2
    assert "did you mean 'clip'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["list", "--format", "yaml"])
