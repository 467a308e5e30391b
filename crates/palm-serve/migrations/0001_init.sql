-- palm serve storage, version 1.
--
-- Portable between SQLite and PostgreSQL: ids are 128-bit lowercase hex strings made in Rust
-- (no AUTOINCREMENT / SERIAL), times are BIGINT unix milliseconds, booleans are BIGINT 0/1,
-- floats are DOUBLE PRECISION. The runner splits this file on semicolons, so none may appear
-- inside a statement or a comment.

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

-- Prompts are deduplicated on the sha256 of their text rather than on the text itself: a
-- PostgreSQL btree entry is limited to about 2.7 kB and prompts can be longer. `seq` keeps the
-- import order, which ties on created_at (a whole import shares one millisecond) would lose.
CREATE TABLE prompts (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    text_hash TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX prompts_seq ON prompts (seq);

CREATE TABLE generations (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts (id),
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    text TEXT NOT NULL,
    reward DOUBLE PRECISION,
    created_at BIGINT NOT NULL
);
CREATE INDEX generations_prompt ON generations (prompt_id);

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts (id),
    created_at BIGINT NOT NULL
);
CREATE INDEX tasks_prompt ON tasks (prompt_id);
CREATE INDEX tasks_created ON tasks (created_at, id);

CREATE TABLE task_replies (
    task_id TEXT NOT NULL REFERENCES tasks (id),
    generation_id TEXT NOT NULL REFERENCES generations (id),
    position BIGINT NOT NULL,
    PRIMARY KEY (task_id, position),
    UNIQUE (task_id, generation_id)
);
CREATE INDEX task_replies_generation ON task_replies (generation_id);

CREATE TABLE assignments (
    task_id TEXT NOT NULL REFERENCES tasks (id),
    user_id TEXT NOT NULL REFERENCES users (id),
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'skipped')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (task_id, user_id)
);
CREATE INDEX assignments_user ON assignments (user_id, state, created_at);

CREATE TABLE rankings (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    ranking TEXT NOT NULL,
    tie BIGINT NOT NULL DEFAULT 0,
    all_bad BIGINT NOT NULL DEFAULT 0,
    skip_reason TEXT,
    draft TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (task_id, user_id),
    FOREIGN KEY (task_id, user_id) REFERENCES assignments (task_id, user_id)
);
CREATE INDEX rankings_user ON rankings (user_id);
CREATE INDEX rankings_created ON rankings (created_at, task_id);

CREATE TABLE demonstrations (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts (id),
    user_id TEXT NOT NULL REFERENCES users (id),
    text TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX demonstrations_prompt ON demonstrations (prompt_id);
CREATE INDEX demonstrations_user ON demonstrations (user_id, prompt_id);

CREATE TABLE write_skips (
    prompt_id TEXT NOT NULL REFERENCES prompts (id),
    user_id TEXT NOT NULL REFERENCES users (id),
    reason TEXT NOT NULL,
    draft TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (prompt_id, user_id)
);
CREATE INDEX write_skips_user ON write_skips (user_id);

-- A writer's unfinished reply, saved while typing; removed when the demonstration is added.
CREATE TABLE write_drafts (
    prompt_id TEXT NOT NULL REFERENCES prompts (id),
    user_id TEXT NOT NULL REFERENCES users (id),
    draft TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (prompt_id, user_id)
);
CREATE INDEX write_drafts_user ON write_drafts (user_id, updated_at);

CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    model TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX conversations_user ON conversations (user_id, created_at);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations (id),
    idx BIGINT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    thumbs BIGINT CHECK (thumbs IN (1, -1)),
    created_at BIGINT NOT NULL,
    UNIQUE (conversation_id, idx)
);
