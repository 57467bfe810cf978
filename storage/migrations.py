"""Numbered, append-only schema migrations, applied in order at start-up.

A migration that has shipped is never edited: change the schema by appending a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "dialogue log",
        """
        -- One row per assistant thread; a chat key (chat_id, topic_id) has at most one open
        -- thread per backend. /reset closes it; the next message opens a new one.
        CREATE TABLE threads (
            id              INTEGER PRIMARY KEY,
            chat_id         INTEGER NOT NULL,
            topic_id        INTEGER NOT NULL DEFAULT 0,
            backend         TEXT    NOT NULL CHECK (backend IN ('openai', 'local')),
            conversation_id TEXT,            -- OpenAI conversation id (openai backend only)
            created_at      TEXT    NOT NULL,
            closed_at       TEXT
        );
        CREATE UNIQUE INDEX threads_open ON threads (chat_id, topic_id, backend)
            WHERE closed_at IS NULL;

        -- Instructions are long and rarely change: stored once, referenced by each turn, so the
        -- fine-tuning export can use the system message that was in force for that turn.
        CREATE TABLE instructions (
            id     INTEGER PRIMARY KEY,
            sha256 TEXT NOT NULL UNIQUE,
            text   TEXT NOT NULL
        );

        -- One row per user request and the bot's answer to it, written in one transaction.
        CREATE TABLE turns (
            id               INTEGER PRIMARY KEY,
            thread_id        INTEGER REFERENCES threads (id),  -- NULL if it could not be opened
            chat_id          INTEGER NOT NULL,
            topic_id         INTEGER NOT NULL DEFAULT 0,
            chat_type        TEXT    NOT NULL,
            user_id          INTEGER,
            user_message_id  INTEGER,         -- Telegram message id of the user's message
            status           TEXT    NOT NULL CHECK (status IN ('ok', 'failed')),
            error_kind       TEXT,            -- rate_limited, timeout, server_error, ...
            model            TEXT    NOT NULL,
            instructions_id  INTEGER REFERENCES instructions (id),
            response_id      TEXT,            -- OpenAI response / completion id
            input_tokens     INTEGER,
            output_tokens    INTEGER,
            latency_ms       INTEGER,         -- from the model request to the last token
            started_at       TEXT    NOT NULL, -- UTC, ISO 8601
            finished_at      TEXT    NOT NULL
        );
        CREATE INDEX turns_thread ON turns (thread_id, id);
        CREATE INDEX turns_user ON turns (user_id);
        CREATE INDEX turns_started ON turns (started_at);

        CREATE TABLE messages (
            id         INTEGER PRIMARY KEY,
            turn_id    INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
            role       TEXT    NOT NULL CHECK (role IN ('user', 'assistant')),
            content    TEXT    NOT NULL,
            created_at TEXT    NOT NULL
        );
        CREATE INDEX messages_turn ON messages (turn_id);

        -- The Telegram messages that carried a bot reply (a long reply is several parts), so
        -- reactions and replies to them can be traced back to the turn.
        CREATE TABLE reply_messages (
            chat_id    INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            turn_id    INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
            part       INTEGER NOT NULL,
            PRIMARY KEY (chat_id, message_id)
        );
        CREATE INDEX reply_messages_turn ON reply_messages (turn_id);
        """,
    ),
    Migration(
        2,
        "sentiment and reactions",
        """
        -- The sentiment of each logged message (replies and user messages alike).
        ALTER TABLE messages ADD COLUMN sentiment_label TEXT
            CHECK (sentiment_label IN ('positive', 'neutral', 'negative'));
        ALTER TABLE messages ADD COLUMN sentiment_score REAL;
        ALTER TABLE messages ADD COLUMN sentiment_source TEXT;  -- model | lexicon
        CREATE INDEX messages_sentiment ON messages (role, sentiment_label);

        -- Users' current reactions on the bot's replies: one row per (message, user, emoji);
        -- a changed reaction replaces the user's rows for that message.
        CREATE TABLE reactions (
            chat_id    INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            user_id    INTEGER NOT NULL,
            emoji      TEXT    NOT NULL,
            polarity   INTEGER NOT NULL CHECK (polarity IN (-1, 0, 1)),
            turn_id    INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
            created_at TEXT    NOT NULL,
            PRIMARY KEY (chat_id, message_id, user_id, emoji)
        );
        CREATE INDEX reactions_turn ON reactions (turn_id);
        """,
    ),
    Migration(
        3,
        "images",
        """
        -- Prepared images (what the vision model was sent), stored once by content hash.
        CREATE TABLE images (
            sha256     TEXT    PRIMARY KEY,
            mime_type  TEXT    NOT NULL,
            width      INTEGER NOT NULL,
            height     INTEGER NOT NULL,
            bytes      INTEGER NOT NULL,
            data       BLOB    NOT NULL,
            created_at TEXT    NOT NULL
        );
        -- The images of a turn's user message, in the order they were sent.
        CREATE TABLE turn_images (
            turn_id  INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            sha256   TEXT    NOT NULL REFERENCES images (sha256),
            PRIMARY KEY (turn_id, position)
        );
        CREATE INDEX turn_images_image ON turn_images (sha256);
        """,
    ),
    Migration(
        4,
        "fine-tuning",
        """
        -- Users who ran /forget: their messages are deleted and they never enter a dataset.
        CREATE TABLE opted_out_users (
            user_id    INTEGER PRIMARY KEY,
            created_at TEXT NOT NULL
        );

        -- Fine-tuning jobs started from the bot (the trainer's id is the primary key).
        CREATE TABLE fine_tune_jobs (
            job_id             TEXT    PRIMARY KEY,
            trainer            TEXT    NOT NULL,   -- openai, ...
            base_model         TEXT    NOT NULL,
            training_file      TEXT,
            validation_file    TEXT,
            train_examples     INTEGER NOT NULL,
            validation_examples INTEGER NOT NULL,
            tokens             INTEGER NOT NULL,
            started_by         INTEGER NOT NULL,   -- Telegram user id of the admin
            description        TEXT    NOT NULL,
            status             TEXT    NOT NULL,   -- validating_files, queued, running, ...
            fine_tuned_model   TEXT,
            error              TEXT,
            created_at         TEXT    NOT NULL,
            updated_at         TEXT    NOT NULL,
            notified_status    TEXT                -- the last status the admin was told about
        );
        CREATE INDEX fine_tune_jobs_open ON fine_tune_jobs (status);

        -- Settings changed from inside the bot (e.g. /model), which outlive restarts.
        CREATE TABLE bot_settings (
            key        TEXT PRIMARY KEY,
            value      TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        """,
    ),
    Migration(
        5,
        "limits and profiles",
        """
        -- The daily message limit counts a user's turns since midnight UTC.
        CREATE INDEX turns_user_started ON turns (user_id, started_at);

        -- The assistant profile each chat (or forum topic) chose with /assistant.
        CREATE TABLE chat_profiles (
            chat_id    INTEGER NOT NULL,
            topic_id   INTEGER NOT NULL DEFAULT 0,
            profile    TEXT    NOT NULL,
            updated_at TEXT    NOT NULL,
            PRIMARY KEY (chat_id, topic_id)
        );
        """,
    ),
    Migration(
        6,
        "durable updates",
        """
        -- Every update Telegram delivers is written here before Telegram is told it arrived
        -- (the next getUpdates, or the webhook's 200), and marked done once handled; what
        -- is not done when the bot starts is replayed.
        CREATE TABLE inbox (
            update_id   INTEGER PRIMARY KEY,
            payload     TEXT    NOT NULL,   -- the update as JSON
            received_at TEXT    NOT NULL,
            done_at     TEXT
        );
        CREATE INDEX inbox_pending ON inbox (update_id) WHERE done_at IS NULL;

        -- A replayed message must not be answered twice: look its turn up.
        CREATE INDEX turns_user_message ON turns (chat_id, user_message_id);
        """,
    ),
    Migration(
        7,
        "threads carried across backends",
        """
        -- When /model moves a chat to a model served elsewhere (another backend), its open
        -- thread is closed and a new one continues it: the new thread names the one it
        -- carries on, so the history it replays (or seeds a conversation with) spans both.
        ALTER TABLE threads ADD COLUMN parent_thread_id INTEGER REFERENCES threads (id);
        """,
    ),
    Migration(
        8,
        "poison updates set aside",
        """
        -- How many times handling of an update started (counted before it starts, so a
        -- crash mid-handling counts). One that never finishes is not replayed forever: after
        -- a few attempts it is quarantined (also marked done) with the reason.
        ALTER TABLE inbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE inbox ADD COLUMN quarantined_at TEXT;
        ALTER TABLE inbox ADD COLUMN reason TEXT;
        """,
    ),
    Migration(
        9,
        "forgetting",
        """
        -- Turns left out of every dataset, and why: other people's turns that quoted someone
        -- who ran /forget (the quoted words themselves are replaced in the log).
        CREATE TABLE dataset_exclusions (
            turn_id    INTEGER PRIMARY KEY REFERENCES turns (id) ON DELETE CASCADE,
            reason     TEXT    NOT NULL,
            created_at TEXT    NOT NULL
        );

        -- Server-side conversations that held forgotten words, kept until the server confirms
        -- their deletion: one that could not be deleted is tried again by the next /forget.
        CREATE TABLE doomed_conversations (
            conversation_id TEXT PRIMARY KEY,
            created_at      TEXT NOT NULL
        );

        -- A handled update is kept only to recognise Telegram delivering it again: its JSON
        -- is blanked minutes after it was handled (quarantined ones keep theirs, for diagnosis)
        -- and the row goes after two days. These find both kinds of row without a scan.
        CREATE INDEX inbox_payload_held ON inbox (done_at)
            WHERE payload != '' AND quarantined_at IS NULL;
        CREATE INDEX inbox_handled ON inbox (received_at) WHERE done_at IS NOT NULL;
        UPDATE inbox SET payload = '' WHERE done_at IS NOT NULL AND quarantined_at IS NULL;
        """,
    ),
    Migration(
        10,
        "input kind",
        """
        -- What the user sent in each turn: text, photo, voice (transcribed audio) or document.
        -- Statistics and datasets tell them apart; turns before this were text or photos.
        ALTER TABLE turns ADD COLUMN input_kind TEXT NOT NULL DEFAULT 'text'
            CHECK (input_kind IN ('text', 'photo', 'voice', 'document'));
        UPDATE turns SET input_kind = 'photo'
            WHERE id IN (SELECT DISTINCT turn_id FROM turn_images);
        """,
    ),
    Migration(
        11,
        "evaluation and canary",
        """
        -- The model the bot asked for in each turn (`model` is the one that answered, as the
        -- server names it: an alias comes back as a dated snapshot). A canary compares
        -- models by this. NULL for turns logged before.
        ALTER TABLE turns ADD COLUMN requested_model TEXT;
        CREATE INDEX turns_requested_model ON turns (requested_model, started_at);

        -- A job's test split: recent conversations /train kept out of its training and
        -- validation files. One item per conversation: the context up to a user's message
        -- (JSON chat messages, redacted as datasets are) and the answer the bot gave then.
        CREATE TABLE eval_items (
            id        INTEGER PRIMARY KEY,
            job_id    TEXT    NOT NULL REFERENCES fine_tune_jobs (job_id) ON DELETE CASCADE,
            position  INTEGER NOT NULL,   -- 0 = the most recent conversation
            context   TEXT    NOT NULL,
            reference TEXT    NOT NULL,
            UNIQUE (job_id, position)
        );
        -- The logged turns an item was made from: /forget removes an item whose words (or
        -- quotes of them) it deletes. No foreign key: a deleted turn must leave its id here.
        CREATE TABLE eval_item_turns (
            item_id INTEGER NOT NULL REFERENCES eval_items (id) ON DELETE CASCADE,
            turn_id INTEGER NOT NULL,
            PRIMARY KEY (item_id, turn_id)
        );
        CREATE INDEX eval_item_turns_turn ON eval_item_turns (turn_id);

        -- One evaluation of a job's candidate model against the model in use then.
        CREATE TABLE eval_runs (
            id              INTEGER PRIMARY KEY,
            job_id          TEXT    NOT NULL REFERENCES fine_tune_jobs (job_id) ON DELETE CASCADE,
            size            INTEGER NOT NULL,   -- items to judge (the first by position)
            current_model   TEXT    NOT NULL,
            current_route   TEXT    NOT NULL,
            candidate_model TEXT    NOT NULL,
            candidate_route TEXT    NOT NULL,
            judge_model     TEXT    NOT NULL,
            requested_by    INTEGER NOT NULL,   -- the admin told of the result
            status          TEXT    NOT NULL CHECK (status IN ('running', 'done')),
            created_at      TEXT    NOT NULL,
            finished_at     TEXT
        );
        CREATE INDEX eval_runs_job ON eval_runs (job_id, id);

        -- Each item's outcome in a run: both answers, and the judge's verdict in each order
        -- ("ab": the model in use shown as answer a; "ba": the candidate as answer a).
        CREATE TABLE eval_results (
            run_id                  INTEGER NOT NULL REFERENCES eval_runs (id) ON DELETE CASCADE,
            item_id                 INTEGER NOT NULL REFERENCES eval_items (id) ON DELETE CASCADE,
            outcome                 TEXT    NOT NULL
                CHECK (outcome IN ('win', 'loss', 'tie', 'error')),  -- the candidate's
            error                   TEXT,   -- what failed: current:KIND, candidate:KIND, judge:KIND
            current_answer          TEXT,
            current_latency_ms      INTEGER,
            current_tokens          INTEGER,
            candidate_answer        TEXT,
            candidate_latency_ms    INTEGER,
            candidate_tokens        INTEGER,
            verdict_ab              TEXT CHECK (verdict_ab IN ('a', 'b', 'tie')),
            confidence_ab           TEXT,
            reason_ab               TEXT,
            verdict_ba              TEXT CHECK (verdict_ba IN ('a', 'b', 'tie')),
            confidence_ba           TEXT,
            reason_ba               TEXT,
            finished_at             TEXT    NOT NULL,
            PRIMARY KEY (run_id, item_id)
        );
        """,
    ),
    Migration(
        12,
        "job notices and dataset options",
        """
        -- The message that follows a fine-tuning job while it runs: it is edited as the
        -- status moves (a new message comes only when the job finishes), after restarts too.
        ALTER TABLE fine_tune_jobs ADD COLUMN notice_message_id INTEGER;
        -- What the job's dataset was built from (the /train options), so that /job describes
        -- it in the reader's language. NULL for jobs started before: `description` says it.
        ALTER TABLE fine_tune_jobs ADD COLUMN dataset_since TEXT;
        ALTER TABLE fine_tune_jobs ADD COLUMN dataset_chat_id INTEGER;
        ALTER TABLE fine_tune_jobs ADD COLUMN dataset_photos INTEGER;
        """,
    ),
)
