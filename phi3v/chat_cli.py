"""`phi3v chat`: an interactive conversation at the terminal.

On a terminal, lines are read with `readline` (line editing, history with the arrow keys). Ctrl-C while an
answer streams stops that answer (the partial answer stays in the conversation) and returns to the prompt; a
second Ctrl-C before it has stopped quits. Ctrl-C drops a line being typed; at an empty prompt it quits, as
Ctrl-D does. Lines that start with "/" are
commands; an unknown one prints the list instead of going to the model ("//" sends a line that starts with "/").
Piped input (not a terminal) is read line by line, without a prompt.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Iterator

from phi3v.cli import _load, _one_line, _params, _user_message, check_frames

COMMANDS = ("/image PATH attaches an image to your next message, /video PATH attaches frames of a video (--frames), "
            "/reset clears the conversation, /help shows this, /quit leaves")
KEYS = "Ctrl-C stops an answer; Ctrl-C at an empty prompt or Ctrl-D quits"


def _is_media(path: str) -> bool:
    return os.path.isfile(path) or path.startswith(("http://", "https://", "data:"))


class _Lines:
    """The user's lines: `input()` with readline on a terminal, plain reads otherwise. None at the end."""

    def __init__(self) -> None:
        self.tty = sys.stdin.isatty()
        self.readline: Any = None
        if self.tty:
            try:
                import readline  # importing it gives input() line editing and history

                self.readline = readline
            except ImportError:  # a Python built without it: input() still works, unedited
                pass

    def read(self) -> str | None:
        if not self.tty:
            line = sys.stdin.readline()
            return line if line else None
        try:
            return input("> ")
        except EOFError:  # Ctrl-D: leave the shell's prompt on a line of its own
            print()
            return None
        except KeyboardInterrupt:  # Ctrl-C: drops a line being typed; at an empty prompt, quits
            print()
            typed = self.readline is not None and self.readline.get_line_buffer()
            return "" if typed else None


class _Stopper:
    """While an answer streams: the first SIGINT asks it to stop (checked between deltas), a second one quits."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def __enter__(self) -> "_Stopper":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _answer(deltas: Iterator[str], stopper: _Stopper) -> tuple[str, bool]:
    """Echo the deltas; (text, stopped early)."""
    parts: list[str] = []
    try:
        for d in deltas:
            sys.stdout.write(d)
            sys.stdout.flush()
            parts.append(d)
            if stopper.stop.is_set():
                return "".join(parts), True
        return "".join(parts), stopper.stop.is_set()
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()  # a stopped answer's request is aborted (its KV blocks freed) before the next one


class _Chat:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        check_frames(a)
        self.params = _params(a)
        self.llm = _load(a)
        self.system = [{"role": "system", "content": a.system}] if a.system else []
        self.history: list[dict[str, Any]] = list(self.system)
        self.images: list[str] = list(a.image or [])
        self.videos: list[str] = list(a.video or [])

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history, self.images, self.videos = list(self.system), [], []
            print("(conversation cleared)", file=sys.stderr)
        elif name == "/help":
            print(f"{COMMANDS}; {KEYS}", file=sys.stderr)
        elif name in ("/image", "/video"):
            kind = name[1:]
            if not arg:
                print(f"usage: {name} PATH", file=sys.stderr)
            elif not _is_media(arg):
                print(f"error: no such {kind} file: {arg}", file=sys.stderr)
            else:
                held = self.images if kind == "image" else self.videos
                held.append(arg)
                print(f"({kind} {len(held)} attached to your next message)", file=sys.stderr)
        else:
            print(f"unknown command {name}: {COMMANDS} (start a message with // to send a leading /)",
                  file=sys.stderr)
        return True

    def ask(self, text: str) -> None:
        msg = _user_message(text, self.images, self.videos, self.a.frames)
        with _Stopper() as stopper:
            try:
                deltas = self.llm.stream(self.history + [msg], sampling_params=self.params, num_crops=self.a.num_crops)
                answer, stopped = _answer(deltas, stopper)
            except ValueError as e:
                print(f"error: {_one_line(e)}", file=sys.stderr)
                return
        print()
        if stopped:
            print("(answer stopped)", file=sys.stderr)
        self.history += [msg, {"role": "assistant", "content": answer}]
        self.images, self.videos = [], []


def cmd_chat(a: argparse.Namespace) -> int:
    chat = _Chat(a)
    lines = _Lines()
    print(f"phi3v chat: {COMMANDS}. {KEYS}.", file=sys.stderr)
    while True:
        line = lines.read()
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not chat.command(line):
                return 0
            continue
        chat.ask(line[1:] if line.startswith("//") else line)
