"""`worker-orcd chat`: a conversation at the terminal, on the model's chat template.

Replies stream as the engine decides them. The history stays within the context: the oldest
exchanges go first when the next reply would not fit. `/reset` forgets the conversation, `/exit`
or Ctrl-D leaves, and Ctrl-C stops the reply being written (its text so far stays in the
history), not the program: during a reply, SIGINT only sets a flag that the step loop reads
between two steps, so the engine is never interrupted halfway through one.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from worker_orcd.engine.llm import LLM
from worker_orcd.engine.sequence import SequenceStatus
from worker_orcd.sampling_params import SamplingParams

PROMPT = ">>> "
HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply"


class Chat:
    def __init__(self, llm: LLM, params: SamplingParams, out: TextIO = sys.stdout):
        self.llm = llm
        self.params = params
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.stop = threading.Event()

    def prompt_ids(self) -> list[int]:
        """The history on the chat template, without its oldest exchanges while it leaves
        less than `max_tokens` of the context for the reply."""
        tokenizer = self.llm.tokenizer
        while True:
            text = tokenizer.apply_chat_template(self.messages)
            ids = tokenizer.encode(text, add_special=False)
            room = self.llm.context_length - len(ids)
            if room >= min(self.params.max_tokens, self.llm.context_length // 2):
                return ids
            if len(self.messages) <= 1:
                raise ValueError(
                    f"the message takes {len(ids)} of the context's "
                    f"{self.llm.context_length} tokens: no room is left for a reply"
                )
            del self.messages[:2]  # the oldest user message and its reply

    def reply(self, text: str) -> tuple[str, int, bool]:
        """Stream the reply to `text`: (the reply, tokens of context it saw, whether Ctrl-C
        stopped it)."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except ValueError:
            self.messages.pop()
            raise
        engine = self.llm.engine
        seq = engine.add(ids, self.params)
        parts: list[str] = []
        self.stop.clear()
        while engine.has_unfinished():
            if self.stop.is_set() and seq.status is not SequenceStatus.FINISHED:
                engine.abort(seq)  # then the loop drains the step still in flight
            for output in engine.step():
                if output.seq is seq and output.text:
                    parts.append(output.text)
                    self.out.write(output.text)
                    self.out.flush()
        reply = "".join(parts)
        self.messages.append({"role": "assistant", "content": reply})
        return reply, len(ids), self.stop.is_set()

    def run(
        self, read: Callable[[str], str] = input, status: Callable[[str], None] = print
    ) -> None:
        """The read-reply loop, until /exit or the end of input."""
        status(HELP)
        while True:
            try:
                line = read(PROMPT).strip()
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell gives
                self.out.write("\n")
                continue
            if line == "/exit":
                return
            if line == "/reset":
                self.messages.clear()
                status("[the conversation is forgotten]")
                continue
            if not line:
                continue
            previous = signal.signal(signal.SIGINT, lambda *_: self.stop.set())
            try:
                _, context, stopped = self.reply(line)
            except ValueError as error:
                status(f"[{error}]")
                continue
            finally:
                signal.signal(signal.SIGINT, previous)
            self.out.write("\n")
            status(f"[{'stopped; ' if stopped else ''}{context} tokens of context]")
