"""The README's first command: the quickstart answers from Python and HTTP, and its curl works."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.conftest import wait_for

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_answers_from_python_and_http_and_its_curl_works(tmp_path: Path) -> None:
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(QUICKSTART)], stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "curl" in out_path.read_text() or proc.poll() is not None,
                 timeout_s=30, message="the quickstart to print its curl command")
        text = out_path.read_text()
        assert proc.poll() is None, text
        assert "from Python: {'input': 2, 'result': 9}" in text
        assert "over HTTP:   {'input': 2, 'result': 9}" in text
        url = re.search(r"curl '([^']+)'", text)
        assert url is not None, text
        assert httpx.get(url.group(1)).json() == {"input": 5, "result": 18}
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the quickstart did not exit within 30 s of Ctrl-C:\n"
                                 + out_path.read_text()) from None
        assert code == 0, out_path.read_text()
        wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                 for c in children), message="the quickstart's processes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
