"""/forget: none of a user's words stay anywhere the bot keeps data.

The store deletes their turns and reactions, blanks the inbox's copies of updates, replaces
quotes of them in other people's turns (and keeps those turns out of datasets) and unlinks
the server-side conversations that held any of it (`store.forget.user`); this service then
deletes those conversations on the server, removes the dataset files built so far, and
checkpoints the database so its write-ahead log no longer holds old copies of the pages
(SQLite's secure_delete zeroes what is deleted in the file itself).

What is out of reach: dataset files already uploaded to a trainer (OpenAI's or one's own)
and models trained on them, and whatever the model's provider keeps beyond deleted
conversations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import openai
from openai import AsyncOpenAI

from bot.errors import classify_model_error
from bot.services.finetune import FineTuner
from storage.interface import ForgetStore

log = logging.getLogger(__name__)

# A quote is a run of at least QUOTE_WORDS consecutive words of one of the forgotten
# user's messages, at least QUOTE_LETTERS letters and digits long (spaces and punctuation
# not counted), compared case-insensitively and whatever the spacing and punctuation
# between the words. Scripts written without spaces count each character as a word. So
# "i do not know what to do" (18 letters) is no quote, "my zebra-striped secret is" (22)
# neither, "my zebra-striped secret is the blue door" (33) is.
QUOTE_WORDS = 4
QUOTE_LETTERS = 24
QUOTE_MARK = "[…]"  # what a quote is replaced with
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+")


class Quotes:
    """The forgotten user's messages as runs of QUOTE_WORDS words, and finding them elsewhere.

    Holds one hash per word of theirs, not the texts.
    """

    def __init__(self) -> None:
        self._runs: set[int] = set()

    def learn(self, text: str) -> None:
        """Take in one of the forgotten user's messages."""
        words = [w.casefold() for w in _WORD.findall(text)]
        for i in range(len(words) - QUOTE_WORDS + 1):
            self._runs.add(hash(tuple(words[i : i + QUOTE_WORDS])))

    def redact(self, text: str) -> str | None:
        """`text` with every quote replaced by QUOTE_MARK; None if it quotes nothing."""
        if not self._runs:
            return None
        found = list(_WORD.finditer(text))
        words = [m.group().casefold() for m in found]
        spans: list[list[int]] = []  # [first word, last word] of each run of matches
        for i in range(len(words) - QUOTE_WORDS + 1):
            if hash(tuple(words[i : i + QUOTE_WORDS])) in self._runs:
                last = i + QUOTE_WORDS - 1
                if spans and i <= spans[-1][1] + 1:
                    spans[-1][1] = last
                else:
                    spans.append([i, last])
        quotes = [
            (first, last)
            for first, last in spans
            if sum(len(found[k].group()) for k in range(first, last + 1)) >= QUOTE_LETTERS
        ]
        if not quotes:
            return None
        parts, position = [], 0
        for first, last in quotes:
            parts += [text[position : found[first].start()], QUOTE_MARK]
            position = found[last].end()
        parts.append(text[position:])
        return "".join(parts)


@dataclass(frozen=True, slots=True)
class ForgetReport:
    messages: int  # the user's logged messages deleted
    quoting_turns: int  # other people's turns that quoted them: redacted, out of datasets
    conversations_deleted: int  # server-side conversations deleted (earlier leftovers too)
    conversations_left: int  # ... that could not be deleted now; the next /forget retries
    datasets_removed: int  # dataset folders removed


class Forgetting:
    """Carries out /forget across the store, the model's server and the dataset files."""

    def __init__(
        self,
        forget: ForgetStore,
        checkpoint: Callable[[], Awaitable[bool]],
        client: AsyncOpenAI,
        finetune: FineTuner,
    ) -> None:
        self._forget = forget
        # The database's own housekeeping after the deletion (`Store.checkpoint`).
        self._checkpoint = checkpoint
        self._client = client
        self._finetune = finetune

    async def forget(self, user_id: int) -> ForgetReport:
        """Delete everything of the user's the bot keeps, and keep them out of datasets."""
        forgotten = await self._forget.user(user_id, Quotes())
        deleted, left = await self.delete_conversations()
        removed = await self._finetune.forget_datasets()
        if not await self._checkpoint():
            log.warning("the database's write-ahead log could not be checkpointed after /forget")
        return ForgetReport(
            messages=forgotten.messages,
            quoting_turns=forgotten.quoting_turns,
            conversations_deleted=deleted,
            conversations_left=left,
            datasets_removed=removed,
        )

    async def delete_conversations(self) -> tuple[int, int]:
        """Delete the conversations /forget queued on the server: (deleted, left for later).

        A failure is logged and the rest carry on; what is left is tried again next time.
        """
        gone: list[str] = []
        left = 0
        for conversation_id in await self._forget.doomed_conversations():
            try:
                await self._client.conversations.delete(conversation_id)
            except openai.NotFoundError:
                pass  # already gone
            except openai.OpenAIError as exc:
                log.warning("could not delete a conversation: %s", classify_model_error(exc).kind)
                left += 1
                continue
            gone.append(conversation_id)
        await self._forget.conversations_gone(gone)
        return len(gone), left
