"""Groups answer only when addressed; allow-lists and the daily limit refuse without model calls."""

from __future__ import annotations

from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import BOT_USER, FakeTelegram

GROUP = -2001


async def test_group_messages_are_answered_only_when_addressed(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        tg.chat(GROUP, "supergroup")
        tg.push_message(GROUP, "just chatting among ourselves", user_id=7, chat_type="supergroup")
        tg.push_message(GROUP, "@someone_else look at this", user_id=7, chat_type="supergroup")
        tg.push_message(
            GROUP, "hey @Parley_Test_Bot what is 2+2?", user_id=7, chat_type="supergroup"
        )
        [answer] = await tg.wait_sent(GROUP, 1)
        assert answer == "echo: hey what is 2+2?"
        bot_reply = tg.messages[(GROUP, max(m for c, m in tg.messages if c == GROUP))]
        tg.push_message(
            GROUP,
            "and 3+3?",
            user_id=8,
            chat_type="supergroup",
            extra={"reply_to_message": bot_reply},
        )
        assert (await tg.wait_sent(GROUP, 2))[-1] == "echo: and 3+3?"
        tg.push_message(GROUP, "/help", user_id=7, chat_type="supergroup")
        assert "/reset" in (await tg.wait_sent(GROUP, 3))[-1]
        await settled(app)
    assert [c.last_user_text for c in oai.calls] == ["hey what is 2+2?", "and 3+3?"]


async def test_group_trigger_all_answers_every_message(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(group_trigger="all")):
        tg.chat(GROUP, "group")
        tg.push_message(GROUP, "no mention here", user_id=7, chat_type="group")
        assert await tg.wait_sent(GROUP, 1) == ["echo: no mention here"]


async def test_topic_creation_reply_does_not_count_as_replying_to_the_bot(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        tg.chat(GROUP, "supergroup", is_forum=True)
        created = {
            "message_id": 1,
            "date": 1,
            "chat": tg.chats[GROUP],
            "from": BOT_USER,
            "forum_topic_created": {"name": "News", "icon_color": 7322096},
        }
        tg.push_message(
            GROUP,
            "plain topic message",
            user_id=7,
            chat_type="supergroup",
            topic_id=1,
            extra={"reply_to_message": created},
        )
        tg.push_message(
            GROUP, "@parley_test_bot in the topic", user_id=7, chat_type="supergroup", topic_id=1
        )
        assert await tg.wait_sent(GROUP, 1) == ["echo: in the topic"]
    assert len(oai.calls) == 1


async def test_allow_lists_refuse_others_without_a_model_call(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings(allowed_user_ids="500", allowed_chat_ids=str(GROUP))
    async with running(settings):
        for chat in (500, 501, 42):
            tg.chat(chat)
            tg.push_message(chat, "hello", user_id=chat)
        assert await tg.wait_sent(500, 1) == ["echo: hello"]
        assert await tg.wait_sent(501, 1) == ["Sorry, this bot is private."]
        assert await tg.wait_sent(42, 1) == ["echo: hello"]  # admins always may
        tg.chat(GROUP, "supergroup")  # anyone in an allowed chat may
        tg.push_message(GROUP, "@parley_test_bot hi", user_id=999, chat_type="supergroup")
        assert await tg.wait_sent(GROUP, 1) == ["echo: hi"]
        tg.chat(-3000, "supergroup")  # elsewhere: quiet unless addressed
        tg.push_message(-3000, "chatter", user_id=999, chat_type="supergroup")
        tg.push_message(-3000, "@parley_test_bot hi", user_id=999, chat_type="supergroup")
        assert await tg.wait_sent(-3000, 1) == ["Sorry, this bot is private."]
    assert sorted(c.last_user_text for c in oai.calls) == ["hello", "hello", "hi"]


async def test_daily_limit_refuses_with_a_clear_message_and_exempts_admins(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    from tests.test_photos import jpeg

    async with running(make_settings(daily_message_limit=2)) as app:
        tg.chat(100)
        for n in range(2):
            tg.push_message(100, f"m{n}", user_id=100)
            await tg.wait_sent(100, n + 1)
            await settled(app)
        tg.push_message(100, "one too many", user_id=100)
        text = (await tg.wait_sent(100, 3))[-1]
        assert "today's limit of 2 messages" in text
        tg.push_photo(100, jpeg(64, 64), user_id=100)
        assert "today's limit" in (await tg.wait_sent(100, 4))[-1]
        tg.chat(42)
        for n in range(3):
            tg.push_message(42, f"admin {n}", user_id=42)
            await tg.wait_sent(42, n + 1)
            await settled(app)
        assert tg.sent_texts(42)[-1] == "echo: admin 2"
    assert len(oai.calls) == 5 and tg.calls_of("getFile") == []
