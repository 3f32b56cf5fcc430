"""`phi3v chat` at a real terminal (a pseudo-terminal, stdlib `pty`): Ctrl-C stops an answer and returns to the
prompt, unknown /commands give help instead of going to the model, Ctrl-C drops a line being typed, Ctrl-D and Ctrl-C
at an empty prompt quit on a line of their own; piped input keeps working without a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from phi3v.cli import main

ROOT = Path(__file__).resolve().parent.parent
CKPT = str(ROOT / "tests" / "data" / "tiny-phi3v")
# the tiny model never says EOS when greedy: an answer of 15000 tokens runs for seconds, long enough to stop
ARGS = ["chat", "--model", CKPT, "--device", "cpu", "--max-tokens", "15000", "--num-crops", "1"]


class Term:
    """A `phi3v chat` child on a pseudo-terminal; `expect` reads until a text shows up."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb", "OMP_NUM_THREADS": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C there is a SIGINT
            os.chdir(str(ROOT))
            os.execve(sys.executable, [sys.executable, "-m", "phi3v", *ARGS], env)
        self.out = ""

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child exited and the pty closed
            return False
        if not data:
            return False
        self.out += data.decode("utf-8", "replace")
        return True

    def expect(self, text: str, timeout: float = 60.0, start: int = 0) -> int:
        """Index in self.out just past the first `text` at or after `start`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            i = self.out.find(text, start)
            if i >= 0:
                return i + len(text)
            if not self._read(0.2):
                break
        raise AssertionError(f"{text!r} did not show up; the terminal said:\n{self.out[-2000:]}")

    def send(self, s: str) -> None:
        os.write(self.fd, s.encode())

    def interrupt_at_prompt(self) -> None:
        """Ctrl-C at the prompt, after a pause as a person's: Python's readline loop only notices a SIGINT that
        lands while it waits in select(), not one that lands while it is still echoing the last key."""
        time.sleep(0.5)
        self.send("\x03")

    def wait(self, timeout: float = 30.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05):
                    if not select.select([self.fd], [], [], 0)[0]:
                        break
                return os.waitstatus_to_exitcode(status)
            self._read(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the chat did not exit; the terminal said:\n{self.out[-2000:]}")


@pytest.fixture
def term():
    t = Term()
    yield t
    try:
        os.kill(t.pid, signal.SIGKILL)
        os.waitpid(t.pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    os.close(t.fd)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_unknown_commands_give_help(term: Term) -> None:
    at = term.expect("> ")
    term.send("/foo\r")
    at = term.expect("unknown command /foo", start=at)
    at = term.expect("> ", start=at)
    assert "/image PATH" in term.out[at - 400:at]  # the help lists the commands
    term.send("Tell me a story.\r")
    at = term.expect("Tell me a story.", start=at)
    while len(term.out) < at + 40:  # the answer streams
        term._read(0.2)
    term.send("\x03")  # Ctrl-C: stops the answer, back at the prompt
    at = term.expect("(answer stopped)", timeout=20, start=at)
    at = term.expect("> ", start=at)
    term.send("//help\r")  # // sends a line that starts with "/" to the model: an answer streams again
    at = term.expect("//help", start=at)
    while len(term.out) < at + 40:
        term._read(0.2)
    term.send("\x03")
    at = term.expect("(answer stopped)", timeout=20, start=at)
    at = term.expect("> ", start=at)
    term.send("\x04")  # Ctrl-D at the prompt quits, and the shell's prompt would start on a new line
    assert term.wait() == 0
    assert term.out[at:].replace("\r", "") == "\n"


@pytest.mark.slow
def test_ctrl_c_drops_a_typed_line_and_quits_at_an_empty_prompt(term: Term) -> None:
    at = term.expect("> ")
    term.send("half a question")
    at = term.expect("half a question", start=at)
    term.interrupt_at_prompt()  # drops the line: a new prompt, nothing sent to the model
    at = term.expect("> ", start=at)
    term.interrupt_at_prompt()
    assert term.wait() == 0
    assert term.out[at:].replace("\r", "").replace("^C", "") == "\n"


def test_piped_input_without_a_terminal(monkeypatch, capsys) -> None:
    img = ROOT / "tests" / "data" / "golden" / "images" / "coffee.png"
    script = f"/image {img}\n/bogus\nWhat is this?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(["chat", "--model", CKPT, "--device", "cpu", "--max-tokens", "5", "--num-crops", "1"])
    out = capsys.readouterr()
    assert code == 0 and "image 1 attached" in out.err and "unknown command /bogus" in out.err
    assert out.out.count("\n") == 1  # one answer: /bogus did not reach the model
