-- The schema Switchboard's store made on sqlite before migrations and before agent skills
-- (the first release; revision 0001): SQLModel.metadata.create_all of the models in
-- `git show a2e3574^:middleware/store.py`, each statement as create_all emitted it for this dialect
-- (recorded with sqlalchemy.create_mock_engine). Upgrade tests start from it: tests/test_migrations.py.

CREATE TABLE inbox (
	id INTEGER NOT NULL,
	platform VARCHAR(128) NOT NULL,
	message_id VARCHAR(300) NOT NULL,
	conversation_key VARCHAR(400) NOT NULL,
	body VARCHAR NOT NULL,
	status VARCHAR(16) NOT NULL,
	received_at FLOAT NOT NULL,
	handled_at FLOAT,
	PRIMARY KEY (id),
	CONSTRAINT uq_inbox_platform_message UNIQUE (platform, message_id)
);

CREATE INDEX ix_inbox_conversation ON inbox (conversation_key, id);

CREATE INDEX ix_inbox_pending ON inbox (status, conversation_key, id);

CREATE TABLE conversation (
	"key" VARCHAR(400) NOT NULL,
	platform VARCHAR(128) NOT NULL,
	external_id VARCHAR(300) NOT NULL,
	state VARCHAR,
	lease_owner VARCHAR(200),
	lease_until FLOAT NOT NULL,
	epoch INTEGER NOT NULL,
	owner VARCHAR(16) NOT NULL,
	queue VARCHAR(128),
	agent VARCHAR(200),
	owner_since FLOAT NOT NULL,
	created_at FLOAT NOT NULL,
	updated_at FLOAT NOT NULL,
	PRIMARY KEY ("key")
);

CREATE INDEX ix_conversation_owner ON conversation (owner);

CREATE TABLE outbox (
	id INTEGER NOT NULL,
	conversation_key VARCHAR(400) NOT NULL,
	platform VARCHAR(128) NOT NULL,
	body VARCHAR NOT NULL,
	idempotency_key VARCHAR(80) NOT NULL,
	status VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at FLOAT NOT NULL,
	last_error VARCHAR,
	created_at FLOAT NOT NULL,
	sent_at FLOAT,
	PRIMARY KEY (id),
	UNIQUE (idempotency_key)
);

CREATE INDEX ix_outbox_pending ON outbox (status, conversation_key, id);

CREATE TABLE timer (
	id INTEGER NOT NULL,
	conversation_key VARCHAR(400) NOT NULL,
	name VARCHAR(64) NOT NULL,
	due_at FLOAT NOT NULL,
	payload VARCHAR NOT NULL,
	status VARCHAR(16) NOT NULL,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_timer_conversation ON timer (conversation_key, name, status);

CREATE INDEX ix_timer_due ON timer (status, due_at);

CREATE TABLE ownership (
	id INTEGER NOT NULL,
	conversation_key VARCHAR(400) NOT NULL,
	"before" VARCHAR(16) NOT NULL,
	"after" VARCHAR(16) NOT NULL,
	actor VARCHAR(200) NOT NULL,
	reason VARCHAR(500) NOT NULL,
	at FLOAT NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_ownership_conversation ON ownership (conversation_key, id);

CREATE TABLE user_vars (
	"key" VARCHAR(400) NOT NULL,
	vars VARCHAR NOT NULL,
	updated_at FLOAT NOT NULL,
	PRIMARY KEY ("key")
);

CREATE TABLE agent (
	name VARCHAR(200) NOT NULL,
	password_hash VARCHAR(500) NOT NULL,
	created_at FLOAT NOT NULL,
	updated_at FLOAT NOT NULL,
	PRIMARY KEY (name)
);

CREATE TABLE agent_session (
	token_hash VARCHAR(64) NOT NULL,
	agent VARCHAR(200) NOT NULL,
	csrf VARCHAR(100) NOT NULL,
	created_at FLOAT NOT NULL,
	seen_at FLOAT NOT NULL,
	expires_at FLOAT NOT NULL,
	PRIMARY KEY (token_hash)
);

CREATE INDEX ix_agent_session_agent ON agent_session (agent);

CREATE INDEX ix_agent_session_expires ON agent_session (expires_at);

CREATE TABLE node (
	node_id VARCHAR(180) NOT NULL,
	incarnation VARCHAR(16) NOT NULL,
	host VARCHAR(300) NOT NULL,
	pid INTEGER NOT NULL,
	pid_start INTEGER NOT NULL,
	state VARCHAR(16) NOT NULL,
	started_at FLOAT NOT NULL,
	seen_at FLOAT NOT NULL,
	PRIMARY KEY (node_id)
);
